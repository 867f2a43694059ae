"""Generation benchmark script: ``python bench/generation.py [--quick] [--target-size 512x8]``.

The same as ``rlhfspec bench generation``; see rlhfspec_workers.benchmarks.generation.
"""

from __future__ import annotations

import sys

from rlhfspec_workers.benchmarks.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["generation", *sys.argv[1:]]))
