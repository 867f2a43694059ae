"""``bench/draft_refresh.py`` end to end on the tiny kit: two iterations of the frozen and the
refreshed arm, one round, the refresh not overlapped (``--no-overlap``; overlapped, the
draft distilled after iteration 1 would draft iteration 3, so two iterations make no refresh).
The refreshed job's trainer distils the draft after iteration 1 before publishing the
weights, so generation drafts with version 0 and then version 1, and the refresh took
trainer time; the frozen job keeps version 0. No timing ratio is asserted: timings on a
shared 2-core machine are fragile (docs/cpu-notes.md §5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]


def test_refreshed_arm_drafts_with_a_new_version_after_a_refresh(
    tiny_kit: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "bench" / "draft_refresh.py"), "--model", "tiny",
               "--iterations", "2", "--rounds", "1", "--arms", "frozen,refreshed",
               "--no-overlap",
               "--out", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1500, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "draft_refresh.json").read_text())
    assert set(doc["arms"]) == {"frozen", "refreshed"}
    frozen = doc["arms"]["frozen"]["iterations"]
    fresh = doc["arms"]["refreshed"]["iterations"]
    assert [r["iteration"] for r in fresh] == [1, 2]
    assert [r["draft_version"] for r in fresh] == [0, 1]
    assert [r["draft_version"] for r in frozen] == [0, 0]
    assert fresh[0]["draft_refresh_seconds"] > 0
    assert doc["arms"]["refreshed"]["draft_refresh_seconds"] > 0
    assert doc["arms"]["frozen"]["draft_refresh_seconds"] == 0
    for rows in (frozen, fresh):
        for row in rows:
            assert row["generation_tokens_per_second"] > 0
            assert 0 < row["draft_acceptance"] <= 1  # the draft_model drafter drafted
    ratios = doc["ratios"]
    assert len(ratios["refreshed_vs_frozen"]["per_iteration"]) == 2
    assert ratios["refresh_pays"]["ratio"] is not None
    assert "refresh pays:" in proc.stdout
