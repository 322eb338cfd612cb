"""`python -m opdcore COMMAND ...` (e.g. `torchrun --nproc-per-node=2 -m opdcore train`)."""
import sys

from opdcore.cli import main

sys.exit(main())
