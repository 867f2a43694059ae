"""The reallocation simulator on another machine's verification grid
(``benchmarks.reallocation_grid``, ``reallocation_sim --cost-grid``): KV bytes from the
model's shape, acceptance read off a generation benchmark's runs, the speed model the grid
gives, and the side-by-side printout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfspec_workers.benchmarks.projection import GRID_SCHEMA
from rlhfspec_workers.benchmarks.reallocation_grid import (
    GridDrafter,
    acceptance_from_generation,
    grid_max_k,
    grid_migration_cost,
    grid_speed,
    kv_bytes_per_token,
    parse_rates,
    pick_model,
)
from rlhfspec_workers.benchmarks.reallocation_sim import main
from rlhfspec_workers.benchmarks.workload import RunResult
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.reallocation import MigrationCost

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
SEVEN_B = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "hidden_size": 3584}  # fmt: skip


def memory_bound(b: int, t: int) -> float:
    """A GPU-like step: flat in T until B x T reaches ~400 tokens, then compute-bound."""
    return 0.005 + 0.00002 * b + max(0.0, 0.000025 * b * t - 0.010)


def grid_doc(t_max: int = 9) -> dict[str, object]:
    samples = [
        [b, t, memory_bound(b, t), [memory_bound(b, t)]]
        for b in BATCHES
        for t in range(1, t_max + 1)
    ]
    model = {"name": "m7b", "dtype": "bfloat16", "context": 256, "config": SEVEN_B,
             "samples": samples}  # fmt: skip
    return {"schema": GRID_SCHEMA, "device": "gpu-x", "models": [model]}


def test_kv_bytes_follow_the_model_shape_and_dtype() -> None:
    model = grid_doc()["models"][0]  # type: ignore[index]
    # Qwen2.5-7B: 28 layers x 4 KV heads x 128 dims x (K and V) x 2 bytes.
    assert kv_bytes_per_token(model) == 28 * 4 * 128 * 2 * 2
    assert kv_bytes_per_token({**model, "dtype": "float32"}) == 28 * 4 * 128 * 2 * 4
    with pytest.raises(ValueError, match="num_hidden_layers"):
        kv_bytes_per_token({**model, "config": {}})
    with pytest.raises(ValueError, match="dtype 'int8'"):
        kv_bytes_per_token({**model, "dtype": "int8"})


def test_pick_model_names_what_the_grid_has() -> None:
    doc = grid_doc()
    assert pick_model(doc, None)["name"] == "m7b"
    with pytest.raises(ValueError, match="the grid has m7b"):
        pick_model(doc, "other")


def test_a_memory_bound_grid_speculates_at_small_batch_and_not_at_large() -> None:
    """Where verifying more tokens is free (small B), the selector drafts deep; where the step
    is compute-bound (large B), drafting costs what it saves and k shrinks."""
    model = grid_doc()["models"][0]  # type: ignore[index]
    drafter = GridDrafter("suffix", (0.7, 0.6), overhead_seconds=0.0005)
    speed = grid_speed(model, "gpu-x", max_batch=128, drafter=drafter)
    plain = grid_speed(model, "gpu-x", max_batch=128)
    small_k = speed.strategies[0][1]
    large_k = speed.strategies[127][1]
    assert small_k >= 3 and large_k < small_k
    assert speed.seconds_per_token(1) < 0.6 * plain.seconds_per_token(1)
    assert plain.strategies[0] == ("off", 0)
    assert plain.step(8) == pytest.approx(memory_bound(8, 1))
    # Prefill: the grid's cheapest cell per token.
    cheapest = min(memory_bound(b, t) / (b * t) for b in BATCHES for t in range(1, 10))
    assert plain.prefill_seconds_per_token == pytest.approx(cheapest)
    assert cheapest < memory_bound(128, 9) / (128 * 9)  # not simply the biggest cell here
    # A draft model whose forward costs as much as the target's step never pays.
    heavy = GridDrafter("draft_model", (0.7, 0.6), forward_ratio=1.0)
    heavy_speed = grid_speed(model, "gpu-x", max_batch=8, drafter=heavy)
    assert all(k == 0 for _, k in heavy_speed.strategies)
    # k never goes past the grid's largest T - 1.
    short = grid_speed(grid_doc(t_max=3)["models"][0], "gpu-x", max_batch=4, drafter=drafter)  # type: ignore[index]
    assert max(k for _, k in short.strategies) <= 2


def test_a_serving_engine_s_own_step_work_is_added_to_every_cell() -> None:
    """--grid-step-overhead: the grid times a bare forward; an engine adds its scheduler and
    sampler to every step, which flattens step time in B and makes drafting cheaper."""
    model = grid_doc()["models"][0]  # type: ignore[index]
    bare = grid_speed(model, "gpu-x", max_batch=64)
    served = grid_speed(model, "gpu-x", max_batch=64, step_overhead=0.02)
    for b in (1, 8, 64):
        assert served.step(b) == pytest.approx(bare.step(b) + 0.02)
    assert served.step(64) / served.step(1) < bare.step(64) / bare.step(1)
    with pytest.raises(ValueError, match="grid-step-overhead"):
        grid_speed(model, "gpu-x", max_batch=4, step_overhead=-0.001)


def test_grid_max_k_stays_inside_what_was_measured() -> None:
    assert grid_max_k(grid_doc(t_max=5)["models"][0], 8) == 4  # type: ignore[index]
    assert grid_max_k(grid_doc(t_max=9)["models"][0], 3) == 3  # type: ignore[index]


def test_migration_cost_keeps_the_hand_over_and_takes_the_grid_s_kv_bytes() -> None:
    model = grid_doc()["models"][0]  # type: ignore[index]
    here = MigrationCost(
        order_seconds=0.03,
        per_sample_seconds=0.001,
        kv_bytes_per_token=1.0,
        kv_bandwidth_bytes_per_second=4e8,
        prefill_seconds_per_token=3e-4,
    )
    there = grid_migration_cost(model, here, bandwidth=2e10)
    assert (there.order_seconds, there.per_sample_seconds) == (0.03, 0.001)
    assert there.kv_bytes_per_token == kv_bytes_per_token(model)
    assert there.kv_bandwidth_bytes_per_second == 2e10
    assert there.prefill_seconds_per_token is None  # the grid's own prefill rate
    with pytest.raises(ValueError, match="grid-kv-bandwidth"):
        grid_migration_cost(model, here, bandwidth=-1.0)


def step(k: int, batch: int, accepted: tuple[int, ...]) -> StepRecord:
    return StepRecord(
        step=0, batch_size=batch, num_finished=0, drafter="draft_model" if k else "off", k=k,
        num_drafts=batch if k else 0, num_draft_tokens=batch * k, num_accepted_tokens=sum(accepted),
        accepted_per_pos=accepted, drafted_per_pos=(), proposer_draft_tokens=batch * k,
        proposer_accepted_tokens=sum(accepted), next_drafter="draft_model", next_k=k,
        next_draft_tokens=batch * k, step_seconds=0.01, draft_seconds=0.001,
    )  # fmt: skip


def test_acceptance_is_read_off_the_largest_k_s_runs() -> None:
    """Rate 0: first tokens accepted per row verified; rate i: accepted at i over at i - 1."""
    steps = [step(0, 10, ()), step(4, 10, (8, 4, 2, 1)), step(4, 10, (6, 4, 2, 0))]
    run = RunResult("fixed:draft_model:4", 0, 1.0, 1.0, 100, 8, steps)
    summary = run.summary()
    assert summary["accepted_per_pos"] == [14, 8, 4, 1] and summary["verified_rows"] == 20
    small = RunResult("fixed:draft_model:2", 0, 1.0, 1.0, 100, 8, [step(2, 10, (1, 0))])
    doc = {"configs": {"fixed:draft_model:4": {"runs": [summary]},
                       "fixed:draft_model:2": {"runs": [small.summary()]},
                       "fixed:suffix:4": {"runs": []}}}  # fmt: skip
    assert acceptance_from_generation(doc, "draft_model") == (0.7, round(8 / 14, 4), 0.5, 0.25)
    with pytest.raises(ValueError, match=r"fixed runs of \['draft_model', 'suffix'\]"):
        acceptance_from_generation(doc, "ngram")
    old = {"configs": {"fixed:draft_model:4": {"runs": [{"tokens": 5}]}}}
    with pytest.raises(ValueError, match="no per-position counts"):
        acceptance_from_generation(old, "draft_model")


def test_rates_on_the_command_line_are_checked() -> None:
    assert parse_rates("0.7, 0.5") == (0.7, 0.5)
    for bad in ("", "0.7,x", "1.5"):
        with pytest.raises(ValueError, match="--acceptance-rates"):
            parse_rates(bad)


def test_cli_simulates_the_same_fleets_on_the_grid_beside_this_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(grid_doc()))
    run = Path(__file__).parents[2] / "bench/data/reallocation-2workers-intel-amx.json"
    out = tmp_path / "out"
    argv = ["--from-run", str(run), "--workers", "2,8", "--samples-per-worker", "48",
            "--max-tokens", "256", "--out", str(out), "--cost-grid", str(grid),
            "--acceptance-rates", "0.7,0.5", "--acceptance-drafter", "suffix"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "m7b on gpu-x" in printed and "ours/static" in printed
    doc = json.loads((out / "reallocation_sim.json").read_text())
    there = doc["on_grid"]
    assert there["kv_bytes_per_token"] == 28 * 4 * 128 * 2 * 2
    assert there["drafter"]["rates"] == [0.7, 0.5]
    assert [r["workers"] for r in there["result"]["rows"]] == [2, 8]
    # The grid's steps are several times faster than this CPU's: the fleets drain sooner.
    for here_row, there_row in zip(doc["rows"], there["result"]["rows"], strict=True):
        assert there_row["static_seconds"] < here_row["static_seconds"] / 2
    with pytest.raises(SystemExit, match="--grid-model 'x'"):
        main([*argv, "--grid-model", "x"])


BENCH_DATA = Path(__file__).parents[2] / "bench/data"


def test_the_grid_path_replays_the_real_run_on_its_own_machine_s_grid() -> None:
    """The committed AMX 2-worker run (vLLM workers, the 512x8 target) replayed with its speed
    taken from a grid of the same target timed on the same CPU kind (bench/gpu_verify_grid.py,
    one thread, as each worker ran): the policies that never move a sample depend on the
    step table alone, and land within 10% of the real makespans. Ours' gain is predicted
    larger than measured (bench/README.md: a bare forward leaves out the engine's own
    per-step work, which makes a step's time depend more on B)."""
    from rlhfspec_workers.benchmarks.reallocation_grid import grid_run_inputs
    from rlhfspec_workers.benchmarks.reallocation_replay import simulator_check

    run = json.loads((BENCH_DATA / "reallocation-2workers-intel-amx.json").read_text())
    doc = json.loads((BENCH_DATA / "verify-grid-cpu-intel-amx-bench-512x8.json").read_text())
    (model,) = doc["models"]
    inputs = grid_run_inputs(run["simulator_inputs"], model, doc["device"])
    assert inputs["partition"] == run["simulator_inputs"]["partition"]
    assert inputs["migration_cost"]["kv_bytes_per_token"] == 8 * 8 * 64 * 2 * 2
    check = simulator_check(inputs, run["summary"])
    for policy in ("static", "threshold"):
        assert 0.9 <= check["real_over_simulated"][policy] <= 1.1, policy
    assert check["ours_ratio"] < 0.85 < check["threshold_ratio"]
    assert check["ours_ratio"] <= run["summary"]["ours"]["vs_static"]
