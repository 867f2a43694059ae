"""Simulated reallocation benchmark: real-run inputs plug in; the CLI writes table, JSON, PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfspec_workers.benchmarks.reallocation_sim import (
    gpu_like_cost_model,
    load_lengths_jsonl,
    main,
    resample,
    simulate_policies,
)
from rlhfspec_workers.reallocation import ThroughputModel
from rlhfspec_workers.reallocation.workload import SimSample, partition_samples


def write_rollouts(path: Path, groups: int, group_size: int) -> Path:
    lines = []
    for g in range(groups):
        for j in range(group_size):
            n = 10 + 40 * (g % 4) + j  # group-correlated lengths
            lines.append(
                json.dumps(
                    {
                        "sample_id": f"p{g}-{j}",
                        "group_id": f"p{g}",
                        "prompt_token_ids": [1] * 12,
                        "token_ids": [5] * n,
                    }
                )
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lengths_load_from_rollout_jsonl(tmp_path: Path) -> None:
    samples = load_lengths_jsonl(write_rollouts(tmp_path / "r.jsonl", 4, 3))
    assert len(samples) == 12
    assert samples[0] == SimSample("p0-0", 10, 12, "p0")
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(ValueError, match="no token_ids"):
        load_lengths_jsonl(tmp_path / "bad.jsonl")


def test_resampling_keeps_groups_whole() -> None:
    pool = [SimSample(f"g{g}-{j}", 100 * (g + 1), 4, f"g{g}") for g in range(3) for j in range(4)]
    out = resample(pool, 40, seed=1, tag="x")
    assert len(out) == 40 and len({s.sample_id for s in out}) == 40
    by_group: dict[str, set[int]] = {}
    for s in out:
        by_group.setdefault(s.group_id or "", set()).add(s.length)
    assert all(len(lengths) == 1 for lengths in by_group.values())  # siblings stay siblings


def test_measured_step_table_and_real_lengths_plug_in(tmp_path: Path) -> None:
    # What bench/reallocation.py has after a 2-worker run: the workers' step profile and the
    # rollouts' lengths, plus the partition the run started from.
    speed = ThroughputModel.from_table(
        [(1, 0.004, 2.5), (8, 0.006, 2.0), (32, 0.016, 1.5)], prefill_seconds_per_token=2e-5
    )
    real = load_lengths_jsonl(write_rollouts(tmp_path / "r.jsonl", 16, 4))
    parts = partition_samples(real, 2, "skewed")
    result = simulate_policies([2], real, speed, partitions={2: parts}, trace_workers=2)
    (row,) = result["rows"]
    assert row["samples"] == len(real)
    assert row["ours_ratio"] <= 1.0 + 1e-9 and row["lpt_ratio"] <= 1.0 + 1e-9
    assert row["bound_ratio"] < 1.0
    assert set(result["trace"]["policies"]) == {"static", "threshold", "planner"}
    assert result["config"]["assignment"] == "given"


def test_cli_prints_the_table_and_writes_json_and_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["--workers", "2,4", "--samples-per-worker", "32", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "ours/st" in table and "targets:" in table
    doc = json.loads((out / "reallocation_sim.json").read_text())
    assert [r["workers"] for r in doc["rows"]] == [2, 4]
    assert all(0.0 < r["ours_ratio"] <= 1.05 for r in doc["rows"])
    assert (out / "reallocation_sim.png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_like_model_is_memory_bound_at_small_batch() -> None:
    cost = gpu_like_cost_model(max_batch=64)
    assert cost.verify_seconds(4, 0) == pytest.approx(cost.verify_seconds(1, 0), rel=0.05)
    # ...and compute-bound once B x T passes ~200 + 2B: k = 8 at B = 64 costs ~1.8x k = 0.
    assert cost.verify_seconds(64, 8) > 1.5 * cost.verify_seconds(64, 0)


def test_a_measured_run_projects_to_more_workers(tmp_path: Path) -> None:
    """--from-run: the committed 2-worker run's step table, prefill rate and KV cost drive the
    fleet-size table (each worker as fast as one engine of that run)."""
    run = Path(__file__).parents[2] / "bench/data/reallocation-2workers-amd-avx512bf16.json"
    out = tmp_path / "out"
    argv = ["--from-run", str(run), "--workers", "2,8", "--samples-per-worker", "48",
            "--max-tokens", "256", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "reallocation_sim.json").read_text())
    inputs = json.loads(run.read_text())["simulator_inputs"]
    assert doc["config"]["migration_cost"]["kv_bytes_per_token"] == pytest.approx(
        inputs["migration_cost"]["kv_bytes_per_token"]
    )
    assert all(r["ours_ratio"] < 1.0 and r["migrations"] > 0 for r in doc["rows"])
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"summary": {}}))
    with pytest.raises(SystemExit, match="simulator_inputs"):
        main(["--from-run", str(bad), "--out", str(out)])
