"""`python -m surogate COMMAND ...` is the `surogate` console script (surogate/training/cli.py), for where the
script is not on PATH or a launcher wants a module: `torchrun --nproc-per-node N -m surogate train cfg.yaml`."""

import sys

from surogate.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
