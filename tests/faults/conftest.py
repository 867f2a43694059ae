"""Fixtures of the fault tests: the tiny kit, and one fault-free run per session.

Where it sits: every fault test compares its recovered job with the same fault-free job
(``fault_free_run``), run once per session by ``fault_harness.run_job`` and shared: greedy
generation makes the two agree sample by sample, so the comparison is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# pytest puts this folder on sys.path (rootdir-relative "prepend" imports, no __init__.py).
from fault_harness import FaultRun, fault_job, run_job


@pytest.fixture(scope="session")
def fault_free_run(tiny_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> FaultRun:
    run = run_job(fault_job(), tmp_path_factory.mktemp("fault-free"), fault=None)
    assert run.killed == [], f"the fault-free run lost workers: {run.killed}"
    return run
