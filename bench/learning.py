"""Held-out accuracy before/after training: RLHFSpec vs a shuffled-reward control vs TRL's
GRPOTrainer (see ``rlhfspec_workers.benchmarks.learning``). Same as ``rlhfspec bench
learning``."""

import sys

from rlhfspec_workers.benchmarks.learning import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
