"""Drafts in hand: model-free drafters draft for every row before the adaptive strategy
chooses, and it scores them on that step's exact fill (``spec_decode.in_hand``,
``AdaptiveStrategy.drafters_in_hand`` / ``choose_with_drafts``, the proposer's
``_drafts_in_hand``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from rlhfspec_workers.drafters.base import DraftRow
from rlhfspec_workers.drafters.ngram import NgramDrafter
from rlhfspec_workers.generation.adaptive import AdaptiveStrategy
from rlhfspec_workers.generation.draft_strategy import NO_DRAFT, DraftChoice, StepFeedback
from rlhfspec_workers.generation.proposer import AdaptiveProposer
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.in_hand import DraftsInHand, rates_given_a_draft
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector
from rlhfspec_workers.spec_decode.synthetic_cost import synthetic_cost_model


@dataclass
class Known:
    """Unconditional rates and fill, as an estimator reports them."""

    unconditional: list[float]
    fill: list[float]

    def rates(self, k: int) -> list[float]:
        return self.unconditional[:k]

    def fill_rates(self, k: int) -> list[float]:
        return self.fill[:k]


def test_acceptance_given_a_draft_divides_out_the_rows_without_one() -> None:
    # Half the rows get a first token, a quarter a second: 0.3 / 0.5 accepted at position 0
    # given a draft; at 1, reaching it given position 0 is 0.25 / 0.5, so 0.2 / 0.5.
    given = rates_given_a_draft(Known([0.3, 0.2], [0.5, 0.25]), 2)
    assert given == pytest.approx([0.6, 0.4])
    # Never above one, and nothing where no draft ever reaches.
    assert rates_given_a_draft(Known([0.9, 0.5], [0.5, 0.0]), 2) == [1.0, 0.0]


def test_expected_acceptance_and_fill_follow_the_lengths_in_hand() -> None:
    hand = DraftsInHand((0.5, 0.5, 0.5, 0.5), lengths=(0, 2, 4), batch_size=4)
    # k = 2: rows of length 2 and 4 expect 0.5 + 0.25 each; the empty row and the row not
    # asked (4th of the batch) nothing.
    assert hand.expected_accepted(2) == pytest.approx(1.5 / 4)
    assert hand.expected_draft_tokens(2) == pytest.approx(4 / 4)
    assert hand.expected_accepted(4) == pytest.approx((0.75 + 0.9375) / 4)
    assert hand.expected_draft_tokens(4) == pytest.approx(6 / 4)
    assert DraftsInHand((0.5,) * 4, (0, 0, 0), 3).expected_accepted(4) == 0.0


def suffix_strategy(given_a_draft: float, fill: float) -> AdaptiveStrategy:
    """An adaptive strategy whose suffix drafter drafted full-length drafts for ``fill`` of
    the rows and got each position accepted with ``given_a_draft`` there (400 rows seen).
    Verifying is free up to 1.5 tokens per row at B = 32 (memory-bound), a suffix lookup
    costs 4 ms a step."""
    est = AcceptanceEstimator("suffix")
    rows, g = 400.0, given_a_draft
    est.update_fill([rows] * 4, [rows * fill] * 4)
    reached = [rows, rows * fill * g, rows * fill * g**2, rows * fill * g**3]
    est.update_positions(reached, [rows * fill * g ** (j + 1) for j in range(4)])
    costs = synthetic_cost_model(drafters=[DrafterCost("suffix", 0.004)], max_k=4)
    return AdaptiveStrategy(AdaptiveSelector(costs, 4), {"suffix": est})


def test_the_choice_follows_this_steps_drafts_not_the_average() -> None:
    strategy = suffix_strategy(given_a_draft=0.9, fill=0.05)
    # On average one row in 20 matches: looked at as an estimate, drafting loses...
    assert strategy.choose(32) == NO_DRAFT
    # ...but the drafter could win if every row had a draft, so it is looked up first...
    assert strategy.drafters_in_hand(32, ["suffix"]) == ["suffix"]
    # ...and where every row has one this step, it drafts; where none has, it does not.
    assert strategy.choose_with_drafts(32, {"suffix": [4] * 32}).drafter == "suffix"
    assert strategy.choose_with_drafts(32, {"suffix": [0] * 32}) == NO_DRAFT
    assert strategy.selector.current is not None and not strategy.selector.current.enabled


def test_a_drafter_that_cannot_win_is_not_looked_up() -> None:
    hopeless = suffix_strategy(given_a_draft=0.0, fill=0.5)
    assert hopeless.drafters_in_hand(32, ["suffix"]) == []
    assert hopeless.drafters_in_hand(32, []) == []  # not model-free: never in hand
    hopeful = suffix_strategy(given_a_draft=0.9, fill=0.05)
    hopeful.in_hand = False
    assert hopeful.drafters_in_hand(32, ["suffix"]) == []


def test_the_choice_after_the_check_reads_what_a_fresh_choice_reads() -> None:
    """The in-hand check hands its estimates to the choice right after it: the choice must
    be what a strategy that skipped the check chooses, and an observation between the two
    must reach the choice (the handed estimates are dropped, not read stale)."""
    for lengths in ([4] * 32, [1] * 16 + [0] * 16, [0] * 32):
        checked, fresh = (suffix_strategy(given_a_draft=0.6, fill=0.3) for _ in range(2))
        assert checked.drafters_in_hand(32, ["suffix"]) == ["suffix"]
        a = checked.choose_with_drafts(32, {"suffix": lengths})
        b = fresh.choose_with_drafts(32, {"suffix": lengths})
        assert (a, checked.expected_accepted) == (b, fresh.expected_accepted)
    strategy = suffix_strategy(given_a_draft=0.9, fill=0.05)
    assert strategy.drafters_in_hand(32, ["suffix"]) == ["suffix"]
    before = strategy.choose_with_drafts(32, {"suffix": [4] * 32})
    assert before.drafter == "suffix"
    assert strategy.drafters_in_hand(32, ["suffix"]) == ["suffix"]
    for _ in range(50):  # every full draft rejected at its first token
        strategy.observe(
            StepFeedback(
                choice=before, batch_size=32, num_drafts=32, num_draft_tokens=32 * before.k,
                num_accepted_tokens=0, accepted_per_pos=(0,) * before.k, step_seconds=0.02,
                draft_seconds=0.004, rows_asked=32,
            )
        )  # fmt: skip
    assert strategy.choose_with_drafts(32, {"suffix": [4] * 32}) == NO_DRAFT


@dataclass
class WantsNgram:
    """A strategy that asks for n-gram drafts in hand and records what it was shown."""

    k: int
    shown: list[Mapping[str, Sequence[int]]] = field(default_factory=list)
    wants_side_drafts = True

    def choose(self, batch_size: int) -> DraftChoice:
        raise AssertionError("with drafts in hand the proposer calls choose_with_drafts")

    def observe(self, feedback: StepFeedback) -> None:
        pass

    def drafters_in_hand(self, batch_size: int, model_free: Sequence[str]) -> list[str]:
        return list(model_free)

    def choose_with_drafts(
        self,
        batch_size: int,
        lengths: Mapping[str, Sequence[int]],
        rooms: Sequence[int] | None = None,
    ) -> DraftChoice:
        self.shown.append(lengths)
        return DraftChoice("ngram", self.k)


def test_the_proposer_sends_the_drafts_in_hand_and_shows_their_lengths() -> None:
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=4),
        model_config=SimpleNamespace(max_model_len=128),
    )
    strategy = WantsNgram(k=2)
    p = AdaptiveProposer(config)
    p.configure(None, {"ngram": NgramDrafter()}, strategy)  # type: ignore[arg-type]
    repeat = np.asarray([1, 2, 3, 4, 5, 1, 2, 3], dtype=np.int64)  # "2 3" seen: 4 5 1 2
    rows = [
        DraftRow("a", repeat, 2, "g", 4),
        DraftRow("b", np.asarray([7, 8, 9, 6], dtype=np.int64), 2, "g", 4),  # no match
        DraftRow("c", repeat, 2, "g", 0),  # no room: not asked
    ]
    in_hand = p._drafts_in_hand(rows, 2)
    assert in_hand == {"ngram": [[4, 5, 1, 2], [], []]}
    choice = p._choose(2, in_hand, rows)
    assert choice == DraftChoice("ngram", 2)
    assert strategy.shown == [{"ngram": [4, 0]}]  # the rows asked, in batch order
    # Chosen: its side drafts are not kept; not chosen: they cover every row asked.
    p._draft_on_the_side(rows, choice, in_hand)
    assert p.side_drafts == {}
    p._draft_on_the_side(rows, NO_DRAFT, in_hand)
    assert p.side_drafts == {"ngram": {"a": [4, 5, 1, 2], "b": []}}
