"""Adaptive mode's strategy without an engine: per-step aging, coordinator table and pooled
acceptance, cost-table coverage, and the benchmark's bandit/oracle helpers."""

from __future__ import annotations

import pytest

from rlhfspec_workers import messages
from rlhfspec_workers.benchmarks.strategies import (
    BanditStrategy,
    Profile,
    buckets,
    hand_tuned_schedule,
    oracle_schedule,
)
from rlhfspec_workers.generation.adaptive import AdaptiveStrategy, estimator_from_rates
from rlhfspec_workers.generation.cost_table import covers
from rlhfspec_workers.generation.draft_strategy import NO_DRAFT, OFF, DraftChoice, StepFeedback
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator, BetaPrior
from rlhfspec_workers.spec_decode.bandit import BanditSelector, strategy_set
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector
from rlhfspec_workers.spec_decode.synthetic_cost import Roofline, synthetic_cost_model

COSTS = synthetic_cost_model(
    Roofline(memory_floor_seconds=0.010, per_token_seconds=0.0002),
    # Drafting costs 1 ms per step: a drafter must earn it (else plain decoding wins).
    drafters=[DrafterCost("suffix", 0.001), DrafterCost("ngram", 0.001)],
    max_batch=256,
    max_k=8,
)


def strategy(
    margin: float = 0.04, half_life: float = 8.0, drafters: tuple[str, ...] = ("suffix", "ngram")
) -> AdaptiveStrategy:
    priors = {"suffix": BetaPrior(0.5, 4.0), "ngram": BetaPrior(0.2, 4.0)}
    estimators = {d: AcceptanceEstimator(d, priors[d]) for d in drafters}
    return AdaptiveStrategy(
        AdaptiveSelector(COSTS, 8, margin=margin), estimators, half_life_steps=half_life
    )


def feedback(drafter: str, k: int, batch: int, accepted_per_pos: tuple[int, ...]) -> StepFeedback:
    return StepFeedback(
        choice=DraftChoice(drafter, k),
        batch_size=batch,
        num_drafts=batch,
        num_draft_tokens=batch * k,
        num_accepted_tokens=sum(accepted_per_pos),
        accepted_per_pos=accepted_per_pos,
        step_seconds=0.02,
        draft_seconds=0.001,
    )


def test_acceptance_ages_per_decode_step_whatever_the_batch() -> None:
    small, large = strategy(), strategy()
    for _ in range(20):
        small.observe(feedback("suffix", 2, 1, (1, 1)))
        large.observe(feedback("suffix", 2, 64, (64, 64)))
    # All accepted in both; the batch of 64 brings 64x the drafts per step, but evidence
    # decays per step, so both hold the same number of half-lives of evidence.
    ratio = large.estimators["suffix"].drafts / small.estimators["suffix"].drafts
    assert ratio == pytest.approx(64, rel=1e-6)
    # Then all rejected: both estimates fall at the same per-step pace.
    for _ in range(8):  # one half-life
        small.observe(feedback("suffix", 2, 1, (0, 0)))
        large.observe(feedback("suffix", 2, 64, (0, 0)))
    assert small.estimators["suffix"].rate(0) == pytest.approx(
        large.estimators["suffix"].rate(0), abs=0.05
    )
    # A drafter not in use drifts back towards its prior (it had no evidence: stays there).
    assert small.estimators["ngram"].rate(0) == pytest.approx(0.2)


def test_good_acceptance_gives_large_k_at_small_batch_and_less_at_large() -> None:
    p = strategy()
    for _ in range(30):
        p.observe(feedback("suffix", 8, 4, (4, 4, 4, 3, 3, 3, 2, 2)))
    small = p.choose(1)
    p.selector.current = None  # judge the large batch on its own
    large = p.choose(256)
    assert small.drafter == "suffix" and small.k >= 4
    assert large.k < small.k
    assert p.choose(0) == NO_DRAFT


def table(version: int, *rows: tuple[int, int, str, int]) -> messages.StrategyTable:
    entries = [
        messages.StrategyEntry(min_batch=a, max_batch=b, drafter=d, k=k) for a, b, d, k in rows
    ]
    return messages.StrategyTable(table_version=version, entries=entries)


def test_coordinator_table_is_the_default_that_local_evidence_can_override() -> None:
    p = strategy(margin=10.0)  # a margin no alternative clears: the table's entry stands
    for _ in range(30):
        p.observe(feedback("suffix", 4, 4, (4, 4, 3, 3)))
    local = p.choose(2)
    assert local.drafter == "suffix" and local.k >= 3
    p.apply_table(table(1, (1, 8, "suffix", 2), (9, 256, OFF, 0)))
    assert p.choose(2) == DraftChoice("suffix", 2)
    assert p.choose(100) == NO_DRAFT  # a new bucket: its entry becomes the default
    # With the usual margin, an entry the local estimates find far worse is overridden
    # (ngram has only its 0.2 prior).
    p.selector.margin = 0.04
    p.apply_table(table(2, (1, 8, "ngram", 8), (9, 256, OFF, 0)))
    assert p.choose(2).drafter == "suffix"
    # Unknown drafters in the table are ignored rather than chosen.
    p.apply_table(table(3, (1, 256, "eagle", 4)))
    assert p.choose(2).drafter == "suffix"


def test_pooled_acceptance_replaces_local_evidence() -> None:
    p = strategy(drafters=("suffix",))
    for _ in range(30):
        p.observe(feedback("suffix", 4, 4, (0, 0, 0, 0)))  # locally useless
    assert p.choose(4) == NO_DRAFT
    pooled = estimator_from_rates("suffix", [0.95, 0.95, 0.95, 0.95, 0.95], drafts=500, like=None)
    p.set_pooled_acceptance({"suffix": pooled, "eagle": pooled})
    assert p.estimators["suffix"].rate(0) > 0.9
    assert p.estimators["suffix"].prior == BetaPrior(0.5, 4.0)  # settings stay local
    assert "eagle" not in p.estimators
    assert p.choose(1).drafter == "suffix"
    # The table's pooled acceptance can come in the same message.
    q = strategy()
    msg = messages.StrategyTable(
        table_version=1,
        entries=[messages.StrategyEntry(min_batch=1, max_batch=256, drafter=OFF, k=0)],
        acceptance={"ngram": [0.99] * 8},
    )
    q.apply_table(msg, acceptance_drafts=1000)
    assert q.estimators["ngram"].rate(3) > 0.95


def test_a_drafter_with_new_weights_is_chosen_again() -> None:
    """A stale draft that collapsed is no longer chosen; after its refresh
    (``drafter_changed``) its estimate restarts from the prior and the selector drafts with
    it again, while the other drafter's evidence stays."""
    s = strategy(drafters=("suffix", "ngram"))
    for _ in range(40):
        s.observe(feedback("suffix", 4, 4, (0, 0, 0, 0)))
        s.observe(feedback("ngram", 2, 4, (1, 0)))
    assert s.choose(4).drafter != "suffix"
    ngram_drafts = s.estimators["ngram"].drafts
    s.drafter_changed("suffix")
    assert s.estimators["suffix"].drafts == 0
    assert s.estimators["ngram"].drafts == ngram_drafts
    assert s.choose(4).drafter == "suffix"  # its prior (0.5 per position) beats ngram's record
    s.drafter_changed("eagle")  # not a drafter of this worker: nothing to forget


def test_estimator_from_rates_holds_the_rates() -> None:
    est = estimator_from_rates("ngram", [0.8, 0.5], drafts=100, like=AcceptanceEstimator("ngram"))
    assert est.trials == [100, 80] and est.successes == [80, 40]
    assert est.expected_accepted(2) == pytest.approx(0.8 + 0.4, abs=0.02)


def test_cached_table_must_cover_drafters_batch_and_k() -> None:
    assert covers(COSTS, ["suffix"], 256, 8)
    assert not covers(COSTS, ["suffix", "draft_model"], 256, 8)
    assert not covers(COSTS, ["suffix"], 512, 8)
    assert not covers(COSTS, ["suffix"], 256, 9)


def record(batch: int, accepted: int, seconds: float) -> StepRecord:
    return StepRecord(
        step=0, batch_size=batch, num_finished=0, drafter="suffix", k=2, num_drafts=batch,
        num_draft_tokens=2 * batch, num_accepted_tokens=accepted, accepted_per_pos=(),
        drafted_per_pos=(), proposer_draft_tokens=0, proposer_accepted_tokens=0,
        next_drafter="suffix", next_k=2, next_draft_tokens=0, step_seconds=seconds,
        draft_seconds=0.0,
    )  # fmt: skip


def test_oracle_and_hand_tuned_schedules_pick_the_measured_best() -> None:
    profile = Profile()
    # At batch 1-2 k=4 emits 3 tokens per 12 ms, off 1 per 10 ms; at 64 off wins.
    profile.add(("suffix", 4), [record(1, 2, 0.012), record(64, 10, 0.5)])
    profile.add((OFF, 0), [record(1, 0, 0.010), record(64, 0, 0.1)])
    assert buckets(6) == [(1, 1), (2, 2), (3, 4), (5, 6)]
    schedule = oracle_schedule(profile, 64)
    assert schedule[0] == (1, 1, "suffix", 4)
    assert schedule[-1] == (33, 64, OFF, 0)
    assert hand_tuned_schedule(profile, "suffix", [(1, 4), (5, 64)]) == [(1, 4, 4), (5, 64, 0)]


def test_bandit_strategy_learns_the_better_arm() -> None:
    bandit = BanditStrategy(BanditSelector(strategy_set(["suffix"], [4]), epsilon=0.0, seed=1))
    for _ in range(10):
        choice = bandit.choose(2)
        accepted = (2, 2, 2, 2) if choice.enabled else ()
        bandit.observe(feedback(choice.drafter, choice.k, 2, accepted))
    assert bandit.choose(2) == DraftChoice("suffix", 4)
    assert bandit.choose(64) == NO_DRAFT  # TLT's guard: no speculation above batch 32
