"""``bench/gpu_verify_grid.py`` (the GPU machine's cost-grid script) run on this CPU with a
tiny random model: its file is what ``rlhfspec bench generation --cost-grid`` reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlhfspec_workers.benchmarks.projection import grid_cost_model, load_grid
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import CostSample, CostTableKey, DrafterCost

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_verify_grid.py"


def run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["--models", "tiny", "--batches", "1,2", "--tokens", "1,3", "--context", "16"]
    args += ["--reps", "2", "--warmup", "1", "--dtype", "float32", "--device", "cpu"]
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_grid_script_measures_every_cell_and_the_projection_reads_it(
    tmp_path: Path,
) -> None:
    done = run(tmp_path / "full")
    assert done.returncode == 0, done.stderr
    doc = load_grid(tmp_path / "full" / "verify-grid.json")
    assert doc["device"].startswith("cpu") and doc["threads"] >= 1
    (model,) = doc["models"]
    assert model["name"] == "tiny" and model["context"] == 16
    cells = {(b, t) for b, t, *_ in model["samples"]}
    assert cells == {(1, 1), (1, 3), (2, 1), (2, 3)}
    for _, _, median, timed in model["samples"]:
        assert len(timed) == 2 and median > 0
    # The proposer's own draft forward, timed on the tiny target's (Qwen2-shaped) draft: one
    # draft position and the catch-up forward, per batch size.
    draft = model["draft"]
    assert draft["name"] == "tiny-draft"
    assert {(b, t) for b, t, *_ in draft["samples"]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(len(timed) == 2 and median > 0 for _, _, median, timed in draft["samples"])
    here = CostModel(CostTableKey("m", "here"), [CostSample(1, 1, 0.01), CostSample(2, 4, 0.05)])
    there = grid_cost_model(model, doc["device"], here)
    assert there.verify_seconds(2, 2) > 0
    with_draft = CostModel(
        CostTableKey("m", "here"),
        [CostSample(1, 1, 0.01), CostSample(2, 4, 0.05)],
        [DrafterCost("draft_model", 0.0, ((1, 9.0),))],  # nothing like what was timed
    )
    per_position = [s for _, t, s, *_ in draft["samples"] if t == 1]
    priced = grid_cost_model(model, doc["device"], with_draft).draft_seconds("draft_model", 2, 3)
    # Three positions at what the timed forwards cost (the cost model fits its curve to
    # them, monotone in B, so a noisy B = 1 above B = 2 is pooled), never here's 9 s.
    assert 3 * min(per_position) * (1 - 1e-9) <= priced <= 3 * max(per_position) * (1 + 1e-9)


def test_a_spent_budget_leaves_a_file_without_models_which_the_projection_refuses(
    tmp_path: Path,
) -> None:
    done = run(tmp_path / "none", "--budget-seconds", "0")
    assert done.returncode == 0, done.stderr
    with pytest.raises(ValueError, match="no measured models"):
        load_grid(tmp_path / "none" / "verify-grid.json")
