"""Time-bounded calibration on real vLLM (CPU, tiny kit): the deadline stops the probes, the
table still covers every (B, k) the selector may ask for, a partial table in the cache is
continued by the next worker instead of measured again, and real steps refine it online."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rlhfspec_workers.generation.adaptive import AdaptiveStrategy, make_strategy
from rlhfspec_workers.generation.calibration_run import (
    CalibrationReport,
    calibrate_engine,
    calibration_max_batch,
)
from rlhfspec_workers.generation.cost_cache import cache_path
from rlhfspec_workers.generation.cost_table import calibrated_cost_model, covers
from rlhfspec_workers.generation.records import PromptInput, SamplingConfig
from rlhfspec_workers.spec_decode.calibration_grid import calibration_plan
from rlhfspec_workers.spec_decode.cost_model import CostModel

pytestmark = pytest.mark.engine

MAX_BATCH = 16  # the draft_engine fixture's slots
MAX_K = 4


@pytest.fixture(scope="module")
def engine(draft_engine: Callable[..., Any]) -> Iterator[Any]:
    e = draft_engine(32)
    yield e
    e.close()


def _assert_monotone(model: CostModel) -> None:
    for k in range(MAX_K + 1):
        col = [model.verify_seconds(b, k) for b in range(1, MAX_BATCH + 1)]
        assert col == sorted(col)
    for b in range(1, MAX_BATCH + 1):
        row = [model.verify_seconds(b, k) for k in range(MAX_K + 1)]
        assert row == sorted(row)


def test_the_deadline_stops_measuring_and_the_table_still_covers(engine: Any) -> None:
    budget = 3.0
    report = CalibrationReport()
    # 40 passes over the grid: far more probes than 3 s hold, even on this tiny model.
    model = calibrate_engine(engine, budget_seconds=budget, repeats=40, report=report)
    assert report.measured and report.skipped
    assert len(report.measured) + len(report.skipped) == len(report.planned)
    assert report.measured[0] == ("verify", "fill", 1, 1)  # the first corner comes first
    # Once over the deadline nothing more runs: the overrun is at most the probe running at
    # the deadline, minus what ran before it (the first probe runs whatever the budget).
    assert report.seconds <= budget + max(report.probe_seconds) + 1.0
    # What was measured is in the table, what was not is fitted: every cell the selector can
    # ask for has a value, monotone in B and k.
    plan = calibration_plan(MAX_BATCH, MAX_K)
    measured = {(b, t) for kind, _, b, t in report.measured if kind == "verify"}
    assert {(s.batch_size, s.tokens_per_seq) for s in model.samples} == measured
    assert set(model.plan) == set(plan)
    assert set(model.missing()) == set(plan) - measured
    # Partial: a planned cell or a drafter's batch size left unmeasured (the drafters' last
    # probes follow the grid's first pass, so a budget can end between the two).
    assert model.partial == bool(set(plan) - measured or model.missing_drafter_batches())
    assert covers(model, engine.drafters, MAX_BATCH, MAX_K)
    assert set(model.drafters) == {"draft_model"}
    _assert_monotone(model)
    for b in (1, MAX_BATCH, 2 * MAX_BATCH):
        for k in range(MAX_K + 1):
            assert model.step_seconds("draft_model", b, k) > 0


def test_batches_beyond_the_kv_cache_are_not_planned_nor_waited_for(tiny_kit: Path) -> None:
    from rlhfspec_api.generation import GenerationSpec
    from rlhfspec_workers.generation.calibrate import probe
    from rlhfspec_workers.generation.draft_strategy import DraftChoice
    from rlhfspec_workers.generation.engine import GenerationEngine

    spec = GenerationSpec.model_validate(
        {
            "speculative": {
                "mode": "adaptive",
                "maxDraftTokens": MAX_K,
                "drafters": [{"method": "suffix"}],
            }
        }
    )
    # 16 slots, but KV blocks for only 3 short sequences at once.
    small = GenerationEngine(
        spec, tiny_kit / "policy", dtype="float32", max_num_seqs=16, kv_cache_bytes=4 << 20
    )
    try:
        assert calibration_max_batch(small) == 3
        # A probe asked for more rows than fit measures the batch that runs, and stops.
        result = probe(small, DraftChoice("off", 0), 16)
        assert result.batch_size == 3 and result.step is not None
        report = CalibrationReport()
        model = calibrate_engine(small, budget_seconds=30.0, report=report)
        assert max(b for b, _ in model.plan) == 3 and report.capacity is None
        assert not model.partial
    finally:
        small.close()


def test_a_partial_cached_table_is_continued_not_measured_again(
    engine: Any, tmp_path: Path, caplog: Any
) -> None:
    # No budget: only the first cell is measured; the rest is fitted and the table says so.
    first = calibrated_cost_model(engine, tmp_path, budget_seconds=0.0)
    assert first.partial and len(first.samples) == 1
    path = cache_path(engine, tmp_path)
    stored = json.loads(path.read_text())
    assert stored["partial"] is True and len(stored["verify"]) == 1
    assert covers(first, engine.drafters, MAX_BATCH, MAX_K)
    # The next worker measures what is missing, keeping the earlier measurement.
    second = calibrated_cost_model(engine, tmp_path, budget_seconds=30.0)
    assert first.samples[0] in second.samples
    cells = [(s.batch_size, s.tokens_per_seq) for s in second.samples]
    assert len(cells) == len(set(cells))  # nothing measured twice
    assert len(second.samples) > 1 and len(second.missing()) < len(first.missing())
    # Once complete, the cache is used as it is.
    if not second.partial:
        with caplog.at_level(logging.INFO, logger="rlhfspec_workers.generation.cost_table"):
            third = calibrated_cost_model(engine, tmp_path, budget_seconds=30.0)
        assert "from cache" in caplog.text
        assert third.to_json() == second.to_json()


def test_real_steps_refine_the_table_and_go_back_to_the_cache(engine: Any, tmp_path: Path) -> None:
    from rlhfspec_api.generation import GenerationSpec

    spec = GenerationSpec.model_validate(
        {
            "speculative": {
                "mode": "adaptive",
                "maxDraftTokens": MAX_K,
                "drafters": [{"method": "draft_model", "model": {"path": "tiny://draft"}}],
            }
        }
    )
    strategy = make_strategy(engine, spec, cache_dir=tmp_path, max_batch=8, budget_seconds=20.0)
    assert isinstance(strategy, AdaptiveStrategy) and strategy.learner is not None
    model = strategy.selector.cost_model
    assert max(b for b, _ in model.plan) == 8  # calibrated only as far as the job will go
    engine.set_strategy(strategy)
    engine.drain_steps()
    prompts = [PromptInput([3 + i, 4 + i, 5 + i, 6], f"p{i}", n=2) for i in range(6)]
    engine.generate_all(prompts, SamplingConfig(temperature=1.0, max_tokens=16, seed=1))
    steps = engine.drain_steps()
    for step in steps:
        strategy.observe_step(step)
    # Every decoding step teaches the table; the step that prefilled the prompts does not.
    decoding = [s for s in steps if s.batch_size > 0 and s.prefill_tokens == 0]
    assert any(s.prefill_tokens > 0 for s in steps)
    assert strategy.learner.steps == len(decoding) > 0
    assert model.observations == strategy.learner.steps
    strategy.learner.save_now()
    stored = CostModel.from_json(cache_path(engine, tmp_path).read_text())
    assert json.loads(stored.to_json())["online"]
    assert sum(stored.evidence(b, float(t)) for b in (1, 4, 8) for t in (1, 2, 3, 5)) > 0
