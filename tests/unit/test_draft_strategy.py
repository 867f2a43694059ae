"""Drafting strategies: fixed, per-batch-size, scripted, and the spec_decode selector adapter."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rlhfspec_workers.generation.draft_strategy import (
    NO_DRAFT,
    BatchSizeStrategy,
    DraftChoice,
    ScriptedStrategy,
    SelectorStrategy,
    StepFeedback,
)
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.draft_choice import BatchRange
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector
from rlhfspec_workers.spec_decode.synthetic_cost import synthetic_cost_model


def feedback(
    drafter: str, k: int, batch: int, drafts: int, per_pos: tuple[int, ...]
) -> StepFeedback:
    return StepFeedback(
        choice=DraftChoice(drafter, k),
        batch_size=batch,
        num_drafts=drafts,
        num_draft_tokens=drafts * k,
        num_accepted_tokens=sum(per_pos),
        accepted_per_pos=per_pos,
        step_seconds=0.01,
        draft_seconds=0.001,
    )


def test_batch_size_strategy_and_script() -> None:
    strategy = BatchSizeStrategy(
        [BatchRange(1, 4, "draft_model", 6), BatchRange(5, 16, "suffix", 2)]
    )
    assert strategy.choose(3) == DraftChoice("draft_model", 6)
    assert strategy.choose(16) == DraftChoice("suffix", 2)
    assert strategy.choose(17) == NO_DRAFT
    script = ScriptedStrategy(lambda call, b: DraftChoice("ngram", call))
    assert [script.choose(8).k for _ in range(3)] == [0, 1, 2]
    assert not DraftChoice("ngram", 0).enabled and not NO_DRAFT.enabled


def test_one_draft_choice_type_across_selector_bandit_and_strategies() -> None:
    """The selector's scored choices and the strategies' per-step choices are one type, and
    it keys the same dict entries as the plain (drafter, k) tuples the bandit uses."""
    costs = synthetic_cost_model(drafters=[DrafterCost("ngram")], max_k=4)
    scored = AdaptiveSelector(costs, 4).select(1, [])
    assert type(scored.strategy) is DraftChoice and scored.strategy == NO_DRAFT
    assert {("ngram", 2): 1}[DraftChoice("ngram", 2)] == 1
    row = BatchRange(2, 4, "ngram", 3)
    assert row.choice == DraftChoice("ngram", 3) and row.covers(4) and not row.covers(5)


def test_selector_strategy_learns_acceptance_and_shrinks_k_with_batch() -> None:
    estimators = {"draft_model": AcceptanceEstimator("draft_model")}
    draft_cost = DrafterCost("draft_model", 0.0005, ((1, 0.0005), (256, 0.002)))
    costs = synthetic_cost_model(drafters=[draft_cost], max_k=8)
    strategy = SelectorStrategy(AdaptiveSelector(costs, 8), estimators)
    # A drafter that is nearly always right: every position accepted.
    for _ in range(50):
        strategy.observe(feedback("draft_model", 8, 16, 16, (16,) * 8))
    assert estimators["draft_model"].drafts > 0
    small, large = strategy.choose(1), strategy.choose(256)
    assert small.drafter == "draft_model" and small.k >= 4
    assert large.k <= small.k


def test_selector_strategy_counts_undrafted_rows_as_rejections() -> None:
    est = AcceptanceEstimator("suffix")
    costs = synthetic_cost_model(drafters=[DrafterCost("suffix")], max_k=4)
    strategy = SelectorStrategy(AdaptiveSelector(costs, 4), {"suffix": est})
    # 4 of 16 rows found a match and had all 4 tokens accepted.
    for _ in range(50):
        strategy.observe(feedback("suffix", 4, 16, 4, (4, 4, 4, 4)))
    assert 0.15 < est.rate(0) < 0.35
    strategy.observe(feedback("off", 0, 16, 0, ()))  # ignored


def test_rows_finished_before_verification_are_no_evidence() -> None:
    """Drafts made for 12 rows, 4 of which finished before the next step verified them: the 8
    verified rows are the evidence (4 accepted at position 1: 0.5), not 12 rows of which 8
    rejected (0.33). Without the count (-1), the batch size stands in, as before."""
    costs = synthetic_cost_model(drafters=[DrafterCost("draft_model")], max_k=4)
    counted, uncounted = AcceptanceEstimator("draft_model"), AcceptanceEstimator("draft_model")
    last: dict[int, tuple[float, float]] = {}
    for est, asked in ((counted, 8), (uncounted, -1)):
        strategy = SelectorStrategy(AdaptiveSelector(costs, 4), {"draft_model": est})
        step = feedback("draft_model", 2, 12, 8, (4, 3))
        for _ in range(60):
            strategy.observe(replace(step, rows_asked=asked))
        before = est.trials[0]
        # A batch's last step: one row asked, finished before its drafts were verified.
        end = feedback("draft_model", 2, 1, 0, (0, 0))
        strategy.observe(replace(end, rows_asked=0 if asked >= 0 else -1))
        last[asked] = (before, est.trials[0])
    assert counted.rate(0) == pytest.approx(0.5, abs=0.02)
    assert uncounted.rate(0) == pytest.approx(1 / 3, abs=0.03)
    assert last[8][1] == last[8][0]  # no trial added
    assert last[-1][1] > last[-1][0]  # counted as one rejected draft
