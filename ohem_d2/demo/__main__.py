"""``python -m ohem_d2.demo``: the command line of :mod:`ohem_d2.demo.cli`."""

import sys

from ..engine.allocator import relaunch_with_allocator
from .cli import main

if __name__ == "__main__":
    # As train_net.py: on jemalloc when found (engine/allocator.py); the per-method training
    # processes inherit it. Only as a command: main(argv) called in-process must not re-exec.
    relaunch_with_allocator("auto")
    sys.exit(main())
