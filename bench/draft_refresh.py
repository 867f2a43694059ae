"""Does keeping the draft model fresh pay? GRPO with the draft refreshed vs frozen vs no
speculation (see ``rlhfspec_workers.benchmarks.draft_refresh``). Same as ``rlhfspec bench
draft-refresh``."""

import sys

from rlhfspec_workers.benchmarks.draft_refresh import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
