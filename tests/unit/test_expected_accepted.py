"""What the selector expected of its drafts travels with the step that made them, and the
bench holds it against what the next step accepted (``workload.expected_against_accepted``)."""

from __future__ import annotations

from rlhfspec_workers.benchmarks.generation_document import predictions
from rlhfspec_workers.benchmarks.workload import expected_against_accepted
from rlhfspec_workers.generation.draft_strategy import SelectorStrategy
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator, BetaPrior
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector
from rlhfspec_workers.spec_decode.synthetic_cost import Roofline, synthetic_cost_model


def step(
    *,
    verified: tuple[str, int] = ("off", 0),
    drafts: int = 0,
    accepted: int = 0,
    made: tuple[str, int] = ("off", 0),
    expected: float = -1.0,
) -> StepRecord:
    return StepRecord(
        step=0, batch_size=8, num_finished=0, drafter=verified[0], k=verified[1],
        num_drafts=drafts, num_draft_tokens=drafts * verified[1], num_accepted_tokens=accepted,
        accepted_per_pos=(), drafted_per_pos=(), proposer_draft_tokens=-1,
        proposer_accepted_tokens=-1, next_drafter=made[0], next_k=made[1],
        next_draft_tokens=8 * made[1], step_seconds=0.01, draft_seconds=0.0,
        next_expected_accepted=expected,
    )  # fmt: skip


def test_each_prediction_meets_the_step_that_verified_it() -> None:
    dm4, sx2 = ("draft_model", 4), ("suffix", 2)
    steps = [
        step(made=dm4, expected=12.0),
        step(verified=dm4, drafts=8, accepted=9, made=dm4, expected=10.0),
        step(verified=dm4, drafts=8, accepted=7, made=sx2, expected=4.0),
        step(verified=sx2, drafts=0, made=dm4, expected=-1.0),  # every row finished
        step(verified=("draft_model", 2), drafts=8, accepted=3, made=dm4, expected=6.0),
    ]
    cells = expected_against_accepted(steps)
    # dm4 made at 0 and 1 was verified at 1 and 2; suffix made at 2 verified nothing; the
    # dm4 made at 3 carries no prediction; the last made nothing verified.
    assert cells == {"draft_model:4": {"steps": 2, "expected": 22.0, "accepted": 16.0}}
    runs = {"ours": {"runs": [{"expected_accepted": cells}, {"expected_accepted": cells}]}}
    pooled = predictions({**runs, "off": {"runs": [{"expected_accepted": {}}]}})
    assert pooled == {
        "ours": {"draft_model:4": {"steps": 4, "expected": 44.0, "accepted": 32.0, "ratio": 0.727}}
    }


def test_a_selector_strategy_keeps_what_it_expected_of_its_choice() -> None:
    cost = synthetic_cost_model(Roofline(), drafters=[DrafterCost("draft_model")], max_k=8)
    good = AcceptanceEstimator("draft_model", prior=BetaPrior(mean=0.9, strength=1e6))
    strategy = SelectorStrategy(AdaptiveSelector(cost, 8), {"draft_model": good})
    choice = strategy.choose(4)
    assert choice.enabled
    assert strategy.expected_accepted == good.expected_accepted(choice.k) > 0.0
    bad = AcceptanceEstimator("draft_model", prior=BetaPrior(mean=0.01, strength=1e6))
    strategy = SelectorStrategy(AdaptiveSelector(cost, 8), {"draft_model": bad})
    assert not strategy.choose(64).enabled
    assert strategy.expected_accepted == -1.0
