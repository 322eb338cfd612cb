"""On-policy distillation with opdcore: `python examples/train.py` or `torchrun --nproc-per-node=2 examples/train.py`
(the same as `opdcore train`).

With no arguments this runs the embedded synthetic default on the CPU; `--help` lists every setting.
"""
import sys

from opdcore.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
