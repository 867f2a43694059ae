"""A draft model's drafting cost learned from measured drafting calls
(``spec_decode.draft_cost_online``, ``CostModel.observe_draft``, the worker's ``CostLearner``)
and the drafting time a replayed step reports (``benchmarks.selector_replay``)."""

from __future__ import annotations

import json
import math

import pytest

from rlhfspec_workers.benchmarks.hindsight_oracle import measured_draft_cost
from rlhfspec_workers.benchmarks.selector_replay import ReplayOptions, replay_strategy
from rlhfspec_workers.generation.cost_learner import CostLearner
from rlhfspec_workers.generation.draft_strategy import DraftChoice, FixedStrategy, StepFeedback
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import (
    CostSample,
    CostTableKey,
    DrafterCost,
    bookkeeping_at,
)
from rlhfspec_workers.spec_decode.draft_cost_online import (
    DRAFT_CLIP,
    DRAFT_PRIOR,
    OnlineDraftCost,
)
from rlhfspec_workers.spec_decode.hindsight import SequenceTrace

PER_TOKEN = 0.002
"""Calibration's price of one draft forward (it has no fixed part)."""


def true_draft(batch: int, k: int) -> float:
    """What a call really costs: a catch-up forward (the fixed part) plus cheaper forwards."""
    return 0.004 + 0.0012 * k


def model() -> CostModel:
    samples = [
        CostSample(b, t, 0.01 + 0.0005 * b * t) for b in (1, 16, 64) for t in (1, 2, 3, 5, 9)
    ]
    drafters = [
        DrafterCost("draft_model", 0.0, ((1, PER_TOKEN), (64, PER_TOKEN))),
        DrafterCost("suffix", 0.0002),
    ]
    return CostModel(CostTableKey("m", "hw"), samples, drafters)


def record(batch: int, k: int, step_seconds: float, draft_seconds: float) -> StepRecord:
    return StepRecord(
        step=0, batch_size=batch, num_finished=0, drafter="draft_model", k=k,
        num_drafts=batch, num_draft_tokens=batch * k, num_accepted_tokens=0,
        accepted_per_pos=(), drafted_per_pos=(), proposer_draft_tokens=0,
        proposer_accepted_tokens=0, next_drafter="draft_model", next_k=k,
        next_draft_tokens=batch * k, step_seconds=step_seconds, draft_seconds=draft_seconds,
    )  # fmt: skip


def test_evidence_moves_a_cell_part_way_then_towards_the_measured_ratio() -> None:
    online = OnlineDraftCost()
    online.observe("d", 64, 1, math.log(2.0))
    assert online.correction("d", 64, 1) == pytest.approx(math.log(2.0) / (1 + DRAFT_PRIOR))
    for _ in range(400):
        online.observe("d", 64, 1, math.log(2.0))
    assert online.correction("d", 64, 1) == pytest.approx(math.log(2.0), rel=0.06)
    # Per k, and per batch size: B = 64 is one cell; B = 32 and k = 2 saw nothing.
    assert online.correction("d", 64, 2) == 0.0
    assert online.correction("d", 32, 1) == 0.0
    # Between two cells: interpolated in log2 B (45 rows: half way between 32 and 64).
    assert 0.0 < online.correction("d", 45, 1) < online.correction("d", 64, 1)
    assert online.correction("other", 64, 1) == 0.0


def test_one_stalled_call_moves_a_cell_by_at_most_the_clip() -> None:
    online = OnlineDraftCost()
    online.observe("d", 8, 4, math.log(100.0))
    assert online.correction("d", 8, 4) == pytest.approx(DRAFT_CLIP / (1 + DRAFT_PRIOR))


def test_old_evidence_fades_when_the_cost_changes() -> None:
    online = OnlineDraftCost()
    for _ in range(300):
        online.observe("d", 16, 2, math.log(2.0))
    for _ in range(300):
        online.observe("d", 16, 2, 0.0)
    assert abs(online.correction("d", 16, 2)) < 0.05 * math.log(2.0)


def test_the_model_learns_a_fixed_part_calibration_missed_for_each_k_drafted() -> None:
    cm = model()
    assert cm.draft_seconds("draft_model", 64, 1) == pytest.approx(PER_TOKEN)
    for _ in range(300):
        for k in (1, 8):
            cm.observe_draft("draft_model", 64, k, true_draft(64, k))
    for k in (1, 8):  # short drafts cost more than calibration said, long ones less
        assert cm.draft_seconds("draft_model", 64, k) == pytest.approx(true_draft(64, k), rel=0.05)
        assert cm.calibrated_draft_seconds("draft_model", 64, k) == pytest.approx(k * PER_TOKEN)
    # k = 4 was never drafted: its calibrated price stands.
    assert cm.draft_seconds("draft_model", 64, 4) == pytest.approx(4 * PER_TOKEN)
    # The step price the selector reads moves with it.
    assert cm.step_seconds("draft_model", 64, 1) == pytest.approx(
        cm.verify_seconds(64, 1) + true_draft(64, 1), rel=0.01
    )
    # A model-free drafter's lookups are priced by its overhead; measured calls there also
    # hold the proposer's bookkeeping, which the verification samples already include.
    cm.observe_draft("suffix", 64, 4, 0.01)
    assert cm.draft_seconds("suffix", 64, 4) == pytest.approx(0.0002)


def test_the_proposers_own_bookkeeping_is_not_learned_as_drafting() -> None:
    """A drafting call is the proposer's whole call; calibration charges the draft model only
    what it adds to the bookkeeping every verification sample already holds."""
    cm = model()
    cm.bookkeeping = ((1, 0.0002), (64, 0.0012))
    for _ in range(300):
        cm.observe_draft("draft_model", 64, 2, true_draft(64, 2) + 0.0012)
        cm.observe_draft("draft_model", 32, 2, true_draft(32, 2) + bookkeeping_at(
            {1: 0.0002, 64: 0.0012}, 32
        ))  # fmt: skip
    for b in (32, 64):
        assert cm.draft_seconds("draft_model", b, 2) == pytest.approx(true_draft(b, 2), rel=0.05)
    assert bookkeeping_at({1: 0.0002, 64: 0.0012}, 32) == pytest.approx(0.0002 + 31 / 63 * 0.001)
    assert bookkeeping_at({4: 0.0004}, 8) == pytest.approx(0.0008)  # per row beyond the ends
    assert bookkeeping_at({}, 8) == 0.0


def test_learned_drafting_costs_survive_a_reload_and_a_later_calibration() -> None:
    cm = model()
    for _ in range(100):
        cm.observe_draft("draft_model", 16, 2, 3 * 2 * PER_TOKEN)
    doc = json.loads(cm.to_json())
    assert doc["draft_online"]
    back = CostModel.from_json(cm.to_json())
    assert back.draft_seconds("draft_model", 16, 2) == pytest.approx(
        cm.draft_seconds("draft_model", 16, 2)
    )
    assert back.draft_seconds("draft_model", 16, 2) > 2.5 * 2 * PER_TOKEN
    later = cm.extended([CostSample(4, 1, 0.012)])
    assert later.draft_seconds("draft_model", 16, 2) == pytest.approx(
        cm.draft_seconds("draft_model", 16, 2)
    )
    # A document from before drafting was learned loads with none.
    del doc["draft_online"]
    old = CostModel.from_json(json.dumps(doc))
    assert old.draft_seconds("draft_model", 16, 2) == pytest.approx(2 * PER_TOKEN)


def test_the_learner_teaches_drafting_and_leaves_verification_clean() -> None:
    """Steps cost verify + the true drafting time. Without the measured drafting time the
    misfit of calibration's drafting price would land in the verification cell (T = 2,
    shared with every strategy verifying one draft token per row)."""
    truth = 1.5 * model().verify_seconds(32, 1)
    runs = {}
    for measured in (True, False):
        cm = model()
        learner = CostLearner(cm)
        for _ in range(400):
            drafting = true_draft(32, 1)
            learner.observe_step(record(32, 1, truth + drafting, drafting if measured else 0.0))
        runs[measured] = cm
    taught = runs[True]
    assert taught.draft_seconds("draft_model", 32, 1) == pytest.approx(true_draft(32, 1), rel=0.05)
    assert taught.verify_seconds(32, 1) == pytest.approx(truth, rel=0.05)
    untaught = runs[False]  # the record measured nothing: calibration's price stands
    assert untaught.draft_seconds("draft_model", 32, 1) == pytest.approx(PER_TOKEN)
    misfit = true_draft(32, 1) - PER_TOKEN  # lands in verification instead
    assert untaught.verify_seconds(32, 1) == pytest.approx(truth + misfit, rel=0.01)
    assert untaught.verify_seconds(32, 1) > truth * 1.04


def test_a_replayed_step_reports_the_drafting_its_fixed_runs_measured() -> None:
    runs = [
        ("fixed:draft_model:2", [record(2, 2, 0.03, 0.005), record(2, 2, 0.03, 0.007)]),
        ("fixed:draft_model:2", [record(1, 2, 0.02, 0.004)]),
        ("off", [record(2, 0, 0.02, 0.0)]),
    ]
    drafting = measured_draft_cost(runs, lambda d, b, k: 1.0)
    assert drafting("draft_model", 2, 2) == pytest.approx(0.006)
    assert drafting("draft_model", 1, 2) == pytest.approx(0.004)
    assert drafting("draft_model", 1, 4) == 1.0  # never measured: the fallback
    seqs = [SequenceTrace("a", 1, 6, {"draft_model": [2] * 5}), SequenceTrace(
        "b", 1, 6, {"draft_model": [1] * 5}
    )]  # fmt: skip

    def cost(drafter: str, batch: int, k: int) -> float:
        return 0.01 * batch + 0.001 * k

    seen: list[StepFeedback] = []

    class Keeping(FixedStrategy):
        def observe(self, feedback: StepFeedback) -> None:
            seen.append(feedback)

    for table, expected in ((drafting, 0.006), (None, 0.0)):
        seen.clear()
        options = ReplayOptions(max_k=2, max_tokens=6, draft_seconds=table)
        replay_strategy(seqs, cost, Keeping(DraftChoice("draft_model", 2)), options)
        at_two = [f.draft_seconds for f in seen if f.batch_size == 2]
        assert at_two and all(s == pytest.approx(expected) for s in at_two)
