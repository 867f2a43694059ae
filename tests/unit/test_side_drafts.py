"""Side drafting: model-free drafters that were not chosen still draft every step, are
scored against the tokens the target emitted, and keep the selector's acceptance measured
(``AdaptiveProposer._draft_on_the_side`` / ``_side_evidence``, ``SelectorStrategy.observe``,
``AcceptanceEstimator.update_positions``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from rlhfspec_workers.drafters.base import DraftRow
from rlhfspec_workers.drafters.ngram import NgramDrafter
from rlhfspec_workers.generation.adaptive import AdaptiveStrategy
from rlhfspec_workers.generation.draft_strategy import (
    NO_DRAFT,
    DraftChoice,
    FixedStrategy,
    SelectorStrategy,
    ShadowEvidence,
    StepFeedback,
)
from rlhfspec_workers.generation.proposer import AdaptiveProposer
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector
from rlhfspec_workers.spec_decode.synthetic_cost import synthetic_cost_model


def selector_strategy(estimator: AcceptanceEstimator) -> SelectorStrategy:
    costs = synthetic_cost_model(drafters=[DrafterCost(estimator.drafter)], max_k=4)
    return SelectorStrategy(AdaptiveSelector(costs, 4), {estimator.drafter: estimator})


def proposer(strategy: object) -> AdaptiveProposer:
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=4),
        model_config=SimpleNamespace(max_model_len=128),
    )
    p = AdaptiveProposer(config)
    p.configure(None, {"ngram": NgramDrafter()}, strategy)  # type: ignore[arg-type]
    return p


def row(tokens: list[int], max_k: int = 4) -> DraftRow:
    return DraftRow("r0", np.asarray(tokens, dtype=np.int64), 2, "g", max_k)


def test_side_draft_is_scored_per_position_and_censored_past_the_emitted_tokens() -> None:
    p = proposer(selector_strategy(AcceptanceEstimator("ngram")))
    rows = [row([1, 2, 3, 4, 5, 1, 2, 3])]  # "2 3" seen before, followed by 4 5 1 2
    p._draft_on_the_side(rows, NO_DRAFT)
    assert p.side_drafts["ngram"]["r0"] == [4, 5, 1, 2]
    # The target then emitted 4, 5, 9 (one sampled token plus two accepted of another draft).
    evidence = p._side_evidence(rows, [[4, 5, 9]])["ngram"]
    assert evidence.trials == (1, 1, 1, 0)  # position 3 never seen: not a rejection
    assert evidence.successes == (1, 1, 0, 0)
    # Only one token emitted (speculation off): only the first position is evidence.
    evidence = p._side_evidence(rows, [[7]])["ngram"]
    assert evidence == ShadowEvidence((1, 0, 0, 0), (0, 0, 0, 0))


def test_no_side_draft_for_the_chosen_drafter_or_a_strategy_that_does_not_learn() -> None:
    rows = [row([1, 2, 3, 4, 5, 1, 2, 3])]
    p = proposer(selector_strategy(AcceptanceEstimator("ngram")))
    p._draft_on_the_side(rows, DraftChoice("ngram", 2))
    assert p.side_drafts == {}
    p = proposer(FixedStrategy(NO_DRAFT))
    p._draft_on_the_side(rows, NO_DRAFT)
    assert p.side_drafts == {}
    p = proposer(selector_strategy(AcceptanceEstimator("ngram")))
    p._draft_on_the_side([row([1, 2, 3, 4, 5, 1, 2, 3], max_k=0)], NO_DRAFT)
    assert p.side_drafts == {"ngram": {}}  # a prefilling row drafts nothing


def test_side_evidence_moves_the_estimate_while_another_strategy_runs() -> None:
    est = AcceptanceEstimator("ngram")
    costs = synthetic_cost_model(drafters=[DrafterCost("ngram")], max_k=4)
    # Acceptance ages per step for drafters seen on the side too, as for the one in use.
    strategy = AdaptiveStrategy(AdaptiveSelector(costs, 4), {"ngram": est}, half_life_steps=4)
    before = est.rate(0)

    def off_step(evidence: ShadowEvidence) -> StepFeedback:
        return StepFeedback(
            choice=NO_DRAFT,
            batch_size=8,
            num_drafts=0,
            num_draft_tokens=0,
            num_accepted_tokens=0,
            accepted_per_pos=(),
            step_seconds=0.01,
            draft_seconds=0.0,
            shadow={"ngram": evidence},
        )

    # 8 rows, each only position 0 observable (off emits one token), 7 of 8 right.
    for _ in range(20):
        strategy.observe(off_step(ShadowEvidence((8, 0, 0, 0), (7, 0, 0, 0))))
    assert est.rate(0) > max(before, 0.8)
    assert strategy.choose(8).drafter == "ngram"  # it now pays to draft with it
    # The drafter then goes wrong: the estimate follows within a few steps.
    for _ in range(10):
        strategy.observe(off_step(ShadowEvidence((8, 0, 0, 0), (0, 0, 0, 0))))
    assert est.rate(0) < 0.3


def test_update_positions_counts_only_observed_positions() -> None:
    est = AcceptanceEstimator("suffix")
    est.update_positions((10, 5, 0), (5, 5, 0), accepted_tokens=10)
    assert est.drafts == 10 and est.accepted_tokens == 10
    assert 0.4 < est.rate(0) < 0.6
    assert est.rate(1) > est.rate(0) + 0.2  # 5 of 5 that got there
    # No trials at position 2: only the chained prior (decay x the position before) speaks.
    assert est.trials[2:] in ([], [0.0])
    assert abs(est.rate(2) - est.prior.position_decay * est.rate(1)) < 1e-9


def test_draft_fill_counts_rows_asked_and_tokens_proposed_per_position() -> None:
    p = proposer(selector_strategy(AcceptanceEstimator("ngram")))
    rows = [
        DraftRow("a", np.asarray([1, 2, 3, 4, 5, 1, 2, 3], dtype=np.int64), 2, "g", 4),
        DraftRow("b", np.asarray([7, 8, 9, 6], dtype=np.int64), 2, "g", 4),  # no match
        DraftRow("c", np.asarray([1, 2, 3, 4, 5, 1, 2, 3], dtype=np.int64), 2, "g", 2),
    ]
    # Chosen ngram at k=3: a gets 3 tokens, b none, c only 2 (its cap).
    drafts = [[4, 5, 1], [], [4, 5]]
    fill = p._draft_fill(rows, DraftChoice("ngram", 3), drafts)["ngram"]
    assert fill.asked == (3, 3, 2) and fill.got == (2, 2, 1)
    # Side drafts are asked for the engine's longest k.
    p._draft_on_the_side(rows, NO_DRAFT)
    side = p._draft_fill(rows, NO_DRAFT, [[], [], []])["ngram"]
    assert side.asked == (3, 3, 2, 2) and side.got == (2, 2, 1, 1)


def test_side_drafts_cover_a_rotating_window_of_rows() -> None:
    from rlhfspec_workers.generation.proposer import SIDE_DRAFT_ROWS

    p = proposer(selector_strategy(AcceptanceEstimator("ngram")))
    tokens = np.asarray([1, 2, 3, 4, 5, 1, 2, 3], dtype=np.int64)
    rows = [DraftRow(f"r{i}", tokens, 2, "g", 4) for i in range(3 * SIDE_DRAFT_ROWS)]
    seen: set[str] = set()
    for call in range(3):
        p.calls = call
        p._draft_on_the_side(rows, NO_DRAFT)
        assert len(p.side_drafts["ngram"]) == SIDE_DRAFT_ROWS
        seen |= set(p.side_drafts["ngram"])
    assert seen == {r.req_id for r in rows}  # every row drafted for in turn
