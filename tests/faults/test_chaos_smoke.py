"""A short chaos soak (``rlhfspec bench chaos``): random SIGKILLs across the roles while a
2-iteration tiny job runs, each killed process restarted as a cluster would; the trainer still
trains exactly the drawn samples, each once, and the coordinator records each iteration once.
The full soak (20 iterations) is not in CI: ``docs/faults.md``, "Chaos soak"."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rlhfspec_workers.benchmarks.chaos import (
    ROLES,
    ChaosMonkey,
    run_restarting,
    tally,
    tiny_greedy_job,
)

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]


def test_random_kills_lose_and_duplicate_nothing(tiny_kit: Path, tmp_path: Path) -> None:
    # Gaps of 4-12 s: the first kill lands while the job runs (about 30 s without kills).
    # Generation is spared only to keep this under a minute (its vLLM restart costs ~15 s);
    # the full soak kills it too.
    roles = [role for role in ROLES if role != "generation"]
    monkey = ChaosMonkey(roles, kill_every=8.0, rng=random.Random(1))
    run = run_restarting(tiny_greedy_job("chaos", 2), tmp_path / "run", timeout=420, chaos=monkey)
    counts = tally(run)
    assert sum(monkey.kills.values()) >= 1
    assert len(run.killed) == sum(monkey.kills.values())  # every kill restarted
    assert (counts.iterations_completed, counts.lost, counts.duplicated) == (2, 0, 0)
    assert counts.unexpected == 0
    assert run.metrics_rows == [1, 2]
