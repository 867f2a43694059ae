"""Whole RLHF iterations, speculation adaptive vs off (see ``rlhfspec_workers.benchmarks.e2e``).
Same as ``rlhfspec bench e2e``."""

import sys

from rlhfspec_workers.benchmarks.e2e import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
