"""``bench/gpu_verify_grid.py`` (the GPU machine's cost-grid script) run on this CPU with a
tiny random model: its file is what ``rlhfspec bench generation --cost-grid`` reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlhfspec_workers.benchmarks.projection import grid_cost_model, load_grid
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import CostSample, CostTableKey

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
    here = CostModel(CostTableKey("m", "here"), [CostSample(1, 1, 0.01), CostSample(2, 4, 0.05)])
    there = grid_cost_model(model, doc["device"], here)
    assert there.verify_seconds(2, 2) > 0


def test_a_spent_budget_leaves_a_file_without_models_which_the_projection_refuses(
    tmp_path: Path,
) -> None:
    done = run(tmp_path / "none", "--budget-seconds", "0")
    assert done.returncode == 0, done.stderr
    with pytest.raises(ValueError, match="no measured models"):
        load_grid(tmp_path / "none" / "verify-grid.json")
