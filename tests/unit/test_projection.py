"""Projection of replayed batches onto another machine's verification grid
(``benchmarks.projection``): reading a grid, pricing drafters there, and the replays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfspec_workers.benchmarks.hindsight_oracle import IterationTraces
from rlhfspec_workers.benchmarks.projection import (
    GRID_SCHEMA,
    grid_cost_model,
    load_grid,
    project,
    projections,
    summary,
)
from rlhfspec_workers.benchmarks.selector_replay import ReplayOptions
from rlhfspec_workers.generation.adaptive import AdaptiveStrategy
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator, BetaPrior
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import CostSample, CostTableKey, DrafterCost
from rlhfspec_workers.spec_decode.hindsight import SequenceTrace
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector

BATCHES = (1, 4, 16, 64)


def grid_model(name: str, seconds: dict[tuple[int, int], float]) -> dict[str, object]:
    samples = [[b, t, s, [s]] for (b, t), s in sorted(seconds.items())]
    return {"name": name, "dtype": "bfloat16", "context": 256, "config": {}, "samples": samples}


def cpu_like() -> dict[tuple[int, int], float]:
    """Compute-bound at once: a step costs what its tokens cost (verifying 4 tokens per row is
    ~4x one)."""
    return {(b, t): 0.002 + 0.001 * b * t for b in BATCHES for t in range(1, 6)}


def gpu_like() -> dict[tuple[int, int], float]:
    """Memory-bound up to 256 tokens a step: verifying more tokens is almost free."""
    return {(b, t): 0.010 + 0.00001 * b * t for b in BATCHES for t in range(1, 6)}


def here_model() -> CostModel:
    samples = [CostSample(b, t, s) for (b, t), s in cpu_like().items()]
    drafters = [
        DrafterCost("ngram", 0.0005),  # model-free: a per-step overhead only
        DrafterCost("draft_model", 0.0, ((1, 0.0002), (64, 0.020))),
    ]
    return CostModel(CostTableKey("m", "cpu"), samples, drafters)


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_bad_grid_file_is_refused_with_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not readable JSON"):
        load_grid(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="schema must be"):
        load_grid(write(tmp_path, {"schema": "other", "models": []}))
    with pytest.raises(ValueError, match="no measured models"):
        load_grid(write(tmp_path, {"schema": GRID_SCHEMA, "models": []}))
    empty = {"schema": GRID_SCHEMA, "models": [{"name": "x", "samples": []}]}
    with pytest.raises(ValueError, match="'x' has no samples"):
        load_grid(write(tmp_path, empty))


def test_the_grid_prices_verification_and_scales_the_draft_model_like_the_target() -> None:
    here = here_model()
    there = grid_cost_model(grid_model("big", gpu_like()), "H100", here)
    assert there.key.hardware_id == "H100"
    assert there.verify_seconds(16, 2) == pytest.approx(gpu_like()[(16, 3)])
    # A model-free drafter's overhead is CPU work: the same there.
    assert there.draft_seconds("ngram", 16, 4) == pytest.approx(0.0005)
    # The draft model's forward shrinks like the target's plain step at that batch size.
    ratio = gpu_like()[(64, 1)] / cpu_like()[(64, 1)]
    assert there.draft_seconds("draft_model", 64, 1) == pytest.approx(0.020 * ratio, rel=1e-6)


def test_a_grid_that_timed_the_draft_forward_prices_the_draft_model_by_it() -> None:
    """Where the grid script timed the proposer's draft forward on that machine, the draft
    model costs what it measured per position (T = 1), whatever it cost here; the proposer's
    per-step overhead (CPU work) stays as measured here."""
    here = CostModel(
        CostTableKey("m", "cpu"),
        [CostSample(b, t, s) for (b, t), s in cpu_like().items()],
        [DrafterCost("draft_model", 0.001, ((1, 0.0002), (64, 0.020)))],
    )
    model = grid_model("big", gpu_like())
    timed = {(1, 1): 0.004, (1, 2): 0.0041, (64, 1): 0.005, (64, 2): 0.0052}
    model["draft"] = {
        "name": "small",
        "config": {},
        "samples": [[b, t, sec, [sec]] for (b, t), sec in timed.items()],
    }
    there = grid_cost_model(model, "H100", here)
    assert there.draft_seconds("draft_model", 64, 3) == pytest.approx(0.001 + 3 * 0.005)
    assert there.draft_seconds("draft_model", 1, 2) == pytest.approx(0.001 + 2 * 0.004)
    # Without the timed draft, the same cell is the scaled guess: far from the measurement.
    del model["draft"]
    guessed = grid_cost_model(model, "H100", here).draft_seconds("draft_model", 64, 3)
    ratio = gpu_like()[(64, 1)] / cpu_like()[(64, 1)]
    assert guessed == pytest.approx(0.001 + 3 * 0.020 * ratio)


def strategy(model: CostModel) -> AdaptiveStrategy:
    estimators = {"ngram": AcceptanceEstimator("ngram", BetaPrior(0.5, 4.0))}
    return AdaptiveStrategy(AdaptiveSelector(model, 4), estimators, half_life_steps=8.0)


def test_drafting_pays_where_verification_is_cheap_and_the_selector_sees_it(
    tmp_path: Path,
) -> None:
    # ngram gets 2 of 4 right at every position: on a compute-bound machine a draft of 2
    # costs ~3x a plain step and pays nothing; memory-bound, it triples the speed.
    seqs = [SequenceTrace(f"s{i}", 1, 50, {"ngram": [2] * 49}) for i in range(16)]
    its = [IterationTraces(seqs, lambda: None)]
    options = ReplayOptions(max_k=4, max_tokens=64, side_drafters=("ngram",))
    here = here_model()
    strategies = [("ngram", k) for k in (1, 2, 4)]
    gpu = project(its, grid_cost_model(grid_model("g", gpu_like()), "gpu", here), strategies,
                  strategy, options, rounds=2)  # fmt: skip
    cpu = project(its, grid_cost_model(grid_model("c", cpu_like()), "cpu", here), strategies,
                  strategy, options, rounds=2)  # fmt: skip
    assert gpu["oracle_over_off"] > 2.0
    assert cpu["oracle_over_off"] < 1.1
    assert gpu["ours"]["over_off"] > 2.0  # ours learnt to draft there...
    assert cpu["ours"]["over_off"] < gpu["ours"]["over_off"] / 2  # ...and not here
    assert gpu["ours"]["over_oracle"] <= 1.0 + 1e-6
    # The file-level entry point: every model of the grid, and its printout.
    path = write(
        tmp_path,
        {
            "schema": GRID_SCHEMA,
            "device": "H100",
            "models": [grid_model("g", gpu_like()), grid_model("c", cpu_like())],
        },
    )
    doc = projections(path, its, here, strategies, strategy, options, 1)
    assert doc["device"] == "H100" and set(doc["models"]) == {"g", "c"}
    lines = summary(doc, {"over_oracle": 0.9, "over_best_fixed": 1.0, "over_off": 1.1})
    assert lines[0].startswith("projected on H100")
    assert any(line.startswith("  g: ours") for line in lines)
