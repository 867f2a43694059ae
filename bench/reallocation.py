"""Sample reallocation on real generation workers: static vs threshold vs ours (see
``rlhfspec_workers.benchmarks.reallocation``). Same as ``rlhfspec bench reallocation``."""

import sys

from rlhfspec_workers.benchmarks.reallocation import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
