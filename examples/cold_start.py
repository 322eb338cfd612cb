"""`opdcore cold-start` as a script: `python examples/cold_start.py --help`."""
import sys

from opdcore.commands.cold_start import main

if __name__ == "__main__":
    sys.exit(main())
