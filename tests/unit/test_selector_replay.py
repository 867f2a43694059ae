"""Ours replayed through the hindsight replay (``benchmarks.selector_replay``): the feedback a
replayed step gives the strategy, and the selector learning from it, on hand-made traces."""

from __future__ import annotations

import pytest

from rlhfspec_workers.benchmarks.hindsight_oracle import (
    IterationTraces,
    oracle_report,
    ours_versus_replays,
)
from rlhfspec_workers.benchmarks.selector_replay import (
    ReplayOptions,
    ours_replayer,
    replay_rounds,
    replay_strategy,
)
from rlhfspec_workers.generation.adaptive import AdaptiveStrategy
from rlhfspec_workers.generation.draft_strategy import DraftChoice, FixedStrategy, StepFeedback
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator, BetaPrior
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.hindsight import OFF, SequenceTrace, replay_fixed
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector
from rlhfspec_workers.spec_decode.synthetic_cost import Roofline, synthetic_cost_model

COSTS = synthetic_cost_model(
    Roofline(memory_floor_seconds=0.010, per_token_seconds=0.0002),
    drafters=[DrafterCost("ngram", 0.001), DrafterCost("suffix", 0.001)],
    max_batch=64,
    max_k=4,
)


def cost(drafter: str, batch: int, k: int) -> float:
    return COSTS.step_seconds(drafter, batch, k)


class Recording:
    """A fixed choice that keeps every feedback it is given."""

    wants_side_drafts = True

    def __init__(self, choice: DraftChoice) -> None:
        self.choice = choice
        self.seen: list[StepFeedback] = []

    def choose(self, batch_size: int) -> DraftChoice:
        return self.choice

    def observe(self, feedback: StepFeedback) -> None:
        self.seen.append(feedback)


def adaptive() -> AdaptiveStrategy:
    estimators = {d: AcceptanceEstimator(d, BetaPrior(0.3, 4.0)) for d in ("ngram", "suffix")}
    return AdaptiveStrategy(AdaptiveSelector(COSTS, 4), estimators, half_life_steps=8.0)


def test_each_step_reports_what_its_drafts_got_and_the_side_drafts() -> None:
    # Row a: ngram matches 2 everywhere, suffix 1; row b: nothing matches; max_tokens 7.
    seqs = [
        SequenceTrace("a", 1, 7, {"ngram": [2] * 6, "suffix": [1] * 6}),
        SequenceTrace("b", 1, 4, {"ngram": [0] * 3, "suffix": [0] * 3}),
    ]
    rec = Recording(DraftChoice("ngram", 3))
    options = ReplayOptions(max_k=4, max_tokens=7, side_drafters=("ngram", "suffix"))
    out = replay_strategy(seqs, cost, rec, options)
    assert out.tokens == replay_fixed(seqs, cost, ("ngram", 3)).tokens
    assert len(rec.seen) == out.steps  # the last step is reported too
    first = rec.seen[0]
    assert first.batch_size == 2 and first.num_drafts == 2 and first.rows_asked == 2
    assert first.num_draft_tokens == 6  # both rows had room for 3
    assert first.accepted_per_pos == (1, 1, 0)  # a accepted 2, b none
    # The chosen drafter drafts on no side; suffix does, scored against what each row emitted:
    # a emitted 3 (positions 0-2 checkable), matched 1: trials (1, 1, 0), successes (1, 0, 0);
    # b emitted 1: trial at position 0, a miss.
    assert set(first.shadow) == {"suffix"}
    assert first.shadow["suffix"].trials[:3] == (2, 1, 0)
    assert first.shadow["suffix"].successes[:3] == (1, 0, 0)
    # Row a at response length 4 (after 1 -> 4) has room for 7 - 4 - 1 = 2 draft tokens.
    second = rec.seen[1]
    assert second.num_draft_tokens == 2 + 3
    # Plain decoding reports no drafts, only side evidence.
    rec_off = Recording(DraftChoice(OFF, 0))
    replay_strategy(seqs, cost, rec_off, options)
    assert all(f.num_drafts == 0 and f.accepted_per_pos == () for f in rec_off.seen)
    assert set(rec_off.seen[0].shadow) == {"ngram", "suffix"}


def test_a_model_free_drafters_fill_is_reported_like_the_proposer_does() -> None:
    # suffix found a 3-token match for row a and nothing for row b: b was asked for a draft
    # and got none (a rejection the estimator must count), and the fill says so.
    seqs = [
        SequenceTrace("a", 1, 30, {"suffix": [3] * 29}, {"suffix": [3] * 29}),
        SequenceTrace("b", 1, 30, {"suffix": [0] * 29}, {"suffix": [0] * 29}),
    ]
    rec = Recording(DraftChoice("suffix", 4))
    options = ReplayOptions(max_k=4, max_tokens=64, side_drafters=("suffix",))
    replay_strategy(seqs, cost, rec, options)
    first = rec.seen[0]
    assert first.rows_asked == 2 and first.num_drafts == 1
    assert first.num_draft_tokens == 3 and first.accepted_per_pos == (1, 1, 1, 0)
    assert first.fill["suffix"].asked == (2, 2, 2, 2)
    assert first.fill["suffix"].got == (1, 1, 1, 0)
    # Plain decoding: suffix drafts on the side, its fill too (window of both rows, k = max_k).
    rec_off = Recording(DraftChoice(OFF, 0))
    replay_strategy(seqs, cost, rec_off, options)
    assert rec_off.seen[0].fill["suffix"].got == (1, 1, 1, 0)


def test_a_fixed_strategy_replays_exactly_like_the_fixed_replay() -> None:
    seqs = [SequenceTrace(f"s{i}", 1, 20 + i, {"ngram": [i % 3] * (19 + i)}) for i in range(5)]
    options = ReplayOptions(max_k=4, max_tokens=64)
    ours = replay_strategy(seqs, cost, FixedStrategy(DraftChoice("ngram", 2)), options)
    fixed = replay_fixed(seqs, cost, ("ngram", 2))
    assert (ours.tokens, ours.steps) == (fixed.tokens, fixed.steps)
    assert ours.seconds == pytest.approx(fixed.seconds)


def test_the_selector_learns_from_replayed_steps_which_drafter_pays() -> None:
    # ngram always gets 4 right, suffix never: after a warm-up round the strategy drafts ngram
    # (it starts from equal priors, and only side drafts tell it about ngram at first).
    seqs = [
        SequenceTrace(f"s{i}", 1, 60, {"ngram": [4] * 59, "suffix": [0] * 59}) for i in range(16)
    ]
    its = [IterationTraces(seqs, lambda: None)]
    options = ReplayOptions(max_k=4, max_tokens=64, side_drafters=("ngram", "suffix"))
    doc = replay_rounds(its, cost, adaptive(), options, warmup=1, rounds=2)
    assert len(doc["rounds"]) == 2 and len(doc["iterations"]) == 1
    top = next(iter(doc["choices"]))
    assert top.startswith("ngram:")
    off = replay_fixed(seqs, cost, (OFF, 0)).tokens_per_second
    assert doc["tokens_per_second"] > 1.5 * off
    # Nothing matches anywhere: it ends up decoding plainly.
    dull = [
        SequenceTrace(f"s{i}", 1, 60, {"ngram": [0] * 59, "suffix": [0] * 59}) for i in range(16)
    ]
    doc = replay_rounds([IterationTraces(dull, lambda: None)], cost, adaptive(), options)
    assert next(iter(doc["choices"])) == f"{OFF}:0"


def test_ours_is_reported_against_the_oracle_off_and_the_best_fixed_replays() -> None:
    seqs = [SequenceTrace(f"s{i}", 1, 40, {"ngram": [2] * 39}) for i in range(8)]
    its = [IterationTraces(seqs, lambda: None)]
    strategies = [("ngram", 1), ("ngram", 2)]
    measured = {"k0": 100.0, "fixed:ngram:1": 150.0, "fixed:ngram:2": 180.0}
    report = oracle_report(its, cost, strategies, measured, [{"off": 100.0}])
    options = ReplayOptions(max_k=4, max_tokens=64, side_drafters=("ngram",))
    run = ours_replayer(lambda: FixedStrategy(DraftChoice("ngram", 2)), its, options, 2)
    doc = ours_versus_replays(run(cost), report)
    # A fixed ngram:2 replayed is exactly the best fixed replay; the oracle is at least it.
    assert doc["best_fixed"] == "fixed:ngram:2"
    assert doc["over_best_fixed"] == pytest.approx(1.0, abs=1e-3)
    assert doc["over_oracle"] <= 1.0 + 1e-3
    assert doc["over_off"] > 1.0
    assert doc["iterations"][0]["over_best_fixed"] == pytest.approx(1.0, abs=1e-3)
    assert doc["tokens_per_second_scaled"] == pytest.approx(
        doc["tokens_per_second"] * report["scale"], rel=1e-3
    )
