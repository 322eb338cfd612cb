"""`opdcore select-prompts` as a script: `python examples/select_prompts.py --help`."""
import sys

from opdcore.commands.select_prompts import main

if __name__ == "__main__":
    sys.exit(main())
