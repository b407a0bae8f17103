"""``python -m esreid``: the command line, also as torchrun starts it
(``torchrun --nproc_per_node=N -m esreid train --config ...``)."""

import sys

from esreid.cli import main

if __name__ == "__main__":
    sys.exit(main())
