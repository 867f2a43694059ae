"""Acceptance by batch phase: the pooled estimate refined where the batch is, with optimism
where a phase has little evidence (``spec_decode.phased``, read by the adaptive strategy)."""

from __future__ import annotations

import pytest

from rlhfspec_workers.generation.adaptive import AdaptiveStrategy, estimator_from_rates
from rlhfspec_workers.generation.draft_strategy import NO_DRAFT, DraftChoice, StepFeedback
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator, BetaPrior
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.phased import PHASE_BOUNDS, PhasedAcceptance, phase_of
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector
from rlhfspec_workers.spec_decode.synthetic_cost import Roofline, synthetic_cost_model


def test_phases_split_the_batch_sizes() -> None:
    assert [phase_of(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 48, 49, 256)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6,
    ]  # fmt: skip
    assert phase_of(10_000) == len(PHASE_BOUNDS)


def test_a_phase_without_evidence_reads_the_pooled_estimate_a_little_optimistically() -> None:
    pooled = estimator_from_rates("d", [0.6, 0.6], drafts=1000, like=None)
    empty = AcceptanceEstimator("d")
    plain = PhasedAcceptance(pooled, empty, z=0.0)
    optimistic = PhasedAcceptance(pooled, empty, z=1.0)
    assert plain.rates(2) == pytest.approx(pooled.rates(2))
    # One sd of a 16-draft posterior at 0.6: +0.12.
    assert optimistic.rates(1)[0] == pytest.approx(0.6 + (0.24 / 17) ** 0.5, abs=1e-3)
    # Much evidence in the phase outweighs the pooled estimate, and the optimism shrinks.
    seen = estimator_from_rates("d", [0.9, 0.9], drafts=2000, like=None)
    assert PhasedAcceptance(pooled, seen).rates(2)[0] == pytest.approx(0.9, abs=0.01)
    assert PhasedAcceptance(pooled, seen).expected_accepted(2) > pooled.expected_accepted(2)


def test_rates_read_in_any_order_equal_a_fresh_reading() -> None:
    """A phased estimate remembers the longest rates it computed and answers shorter asks
    with their prefix: asked k = 1, 2, 4, 8, 11 (past the first computation) or backwards,
    it must say what a fresh object says for that k alone."""
    pooled = estimator_from_rates("d", [0.8, 0.6, 0.5, 0.4], drafts=50, like=None)
    pooled.update_fill([10.0, 10.0, 10.0], [9.0, 6.0, 3.0])
    phase = estimator_from_rates("d", [0.9, 0.3], drafts=20, like=None)
    phase.update_fill([5.0, 5.0], [5.0, 1.0])
    reused = PhasedAcceptance(pooled, phase)
    for k in (1, 2, 4, 8, 11, 3, 1):
        fresh = PhasedAcceptance(pooled, phase)
        assert reused.rates(k) == fresh.rates(k)
        assert reused.fill_rates(k) == fresh.fill_rates(k)
        assert reused.expected_accepted(k) == fresh.expected_accepted(k)
        assert reused.expected_draft_tokens(k) == fresh.expected_draft_tokens(k)
        assert len(reused.rates(k)) == k
    # The returned lists are copies: a caller changing one changes no later answer.
    reused.rates(2)[0] = -1.0
    assert reused.rates(2)[0] > 0.0


# Plain decoding 10 ms a step plus 0.05 ms a token; a draft model 2 ms a step: one drafted
# token costs 1.2x plain decoding at 4 rows and 1.4x at 64.
COSTS = synthetic_cost_model(
    Roofline(memory_floor_seconds=0.010, per_token_seconds=0.00005),
    drafters=[DrafterCost("draft_model", 0.002)],
    max_batch=256,
    max_k=4,
)


def feedback(batch: int, accepted: int) -> StepFeedback:
    """A draft of 1 token on every row, ``accepted`` of them taken."""
    return StepFeedback(
        choice=DraftChoice("draft_model", 1), batch_size=batch, num_drafts=batch,
        num_draft_tokens=batch, num_accepted_tokens=accepted, accepted_per_pos=(accepted,),
        step_seconds=0.02, draft_seconds=0.002, rows_asked=batch,
    )  # fmt: skip


def test_a_drafter_good_at_the_batch_s_start_is_used_there_not_in_its_tail() -> None:
    """What RL batches do: the draft model accepts 95% of the first steps' 64 young rows and
    12.5% of the 4 stragglers left at the end. The pooled estimate (mostly straggler steps, the
    many steps of the tail) would turn drafting off everywhere; by phase, the strategy drafts
    where the batch is large and stops in the tail."""
    prior = BetaPrior(0.6, 4.0)
    s = AdaptiveStrategy(
        AdaptiveSelector(COSTS, 4, k_values=(1,)),
        {"draft_model": AcceptanceEstimator("draft_model", prior)},
    )
    for _ in range(5):  # five batches
        for _ in range(2):
            s.observe(feedback(64, 61))
        for step in range(40):
            s.observe(feedback(4, step % 2))
    assert s.estimators["draft_model"].rate(0) < 0.5  # pooled: the tail's
    assert s.choose(64) == DraftChoice("draft_model", 1)
    assert s.choose(4) == NO_DRAFT
    # A phase never drafted in (17-32 rows) is tried: the pooled estimate plus its doubt.
    assert PhasedAcceptance(s.estimators["draft_model"], s._phase("draft_model", 4)).rates(1)[
        0
    ] > s.estimators["draft_model"].rate(0)
