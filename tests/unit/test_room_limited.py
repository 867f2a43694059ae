"""Rows near their cap take short drafts or none: the selector scores drafters on the batch's
rooms (``spec_decode.in_hand.RoomLimited``), which the proposer computes from each row's
``max_tokens`` and hands to the strategy with every choice."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from rlhfspec_workers.generation.adaptive import AdaptiveStrategy
from rlhfspec_workers.generation.draft_strategy import NO_DRAFT, DraftChoice, StepFeedback
from rlhfspec_workers.generation.proposer import AdaptiveProposer
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator, FixedAcceptance
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.in_hand import RoomLimited
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector, evaluate
from rlhfspec_workers.spec_decode.synthetic_cost import synthetic_cost_model


def test_each_row_counts_with_the_draft_its_room_allows() -> None:
    half = FixedAcceptance((0.5,))
    limited = RoomLimited.of(half, [0, 1, 9, 4], max_k=4)
    assert limited.rooms == (1, 1, 0, 0, 2) and limited.batch_size == 4
    # k = 4: the finishing row nothing, the row with room 1 one token, the others four.
    want = (half.expected_accepted(1) + 2 * half.expected_accepted(4)) / 4
    assert limited.expected_accepted(4) == pytest.approx(want)
    assert limited.expected_draft_tokens(2) == pytest.approx((1 + 2 + 2) / 4)
    assert limited.expected_accepted(0) == 0.0
    # Every row with full room: the model itself.
    full = RoomLimited.of(half, [4, 7, 4], max_k=4)
    assert full.expected_accepted(3) == pytest.approx(half.expected_accepted(3))
    assert full.expected_draft_tokens(3) == pytest.approx(3.0)


def test_the_fill_of_a_model_free_drafter_is_cut_to_the_room() -> None:
    est = AcceptanceEstimator("suffix")
    est.update_fill([100.0] * 4, [50.0] * 4)  # half the rows asked get a draft
    limited = RoomLimited.of(est, [1, 4], max_k=4)
    got = limited.expected_draft_tokens(4)
    assert got == pytest.approx((est.expected_draft_tokens(1) + est.expected_draft_tokens(4)) / 2)
    assert got < est.expected_draft_tokens(4)


def draft_model_strategy(acceptance: float) -> AdaptiveStrategy:
    est = AcceptanceEstimator("draft_model")
    rows = 2000.0
    est.update_positions(
        [rows * acceptance**j for j in range(4)], [rows * acceptance ** (j + 1) for j in range(4)]
    )
    costs = synthetic_cost_model(drafters=[DrafterCost("draft_model", 0.002)], max_k=4)
    return AdaptiveStrategy(AdaptiveSelector(costs, 4, margin=0.0), {"draft_model": est})


def test_a_batch_of_finishing_rows_is_not_drafted_for() -> None:
    strategy = draft_model_strategy(0.8)
    assert strategy.choose(4).enabled
    # The same four rows, each on its last token: no draft fits, so drafting only costs.
    assert strategy.choose_with_drafts(4, {}, [0, 0, 0, 0]) == NO_DRAFT
    assert strategy.expected_accepted == -1.0
    # Room for one token each: at most k = 1 is worth asking for, and it is expected to
    # get what one token gets, per row.
    short = strategy.choose_with_drafts(4, {}, [1, 1, 1, 1])
    assert short == DraftChoice("draft_model", 1)
    phased = strategy._phased(4)["draft_model"]
    assert strategy.expected_accepted == pytest.approx(phased.expected_accepted(1))
    # Rooms not given, or switched off: every row counts as taking a full draft.
    assert strategy.choose_with_drafts(4, {}, None).k > 1
    strategy.room_aware = False
    assert strategy.choose_with_drafts(4, {}, [0, 0, 0, 0]).enabled


def test_the_selector_scores_a_half_finished_batch_on_the_rows_that_can_draft() -> None:
    strategy = draft_model_strategy(0.8)
    costs = strategy.selector.cost_model
    phased = strategy._phased(8)["draft_model"]
    limited = RoomLimited.of(phased, [4] * 4 + [0] * 4, max_k=4)
    scored = evaluate("draft_model", limited, 8, 4, costs)
    full = evaluate("draft_model", phased, 8, 4, costs)
    assert scored.tokens_per_second < full.tokens_per_second
    # Half the rows emit k + 1 expected tokens' worth, half one token; verification of
    # half the batch's drafts is all the step pays for.
    emitted = 4 * (phased.expected_accepted(4) + 1) + 4 * 1
    seconds = costs.verify_tokens_seconds(8, 1 + 4 * 4 / 8) + costs.draft_seconds(
        "draft_model", 8, 4
    )
    assert scored.tokens_per_second == pytest.approx(emitted / seconds)


@dataclass
class RecordsRooms:
    """Chooses ``choice`` every step; records the rooms it is handed and the feedback."""

    choice: DraftChoice = NO_DRAFT
    seen: list[tuple[int, list[int]]] = field(default_factory=list)
    feedback: list[StepFeedback] = field(default_factory=list)
    wants_side_drafts = False

    def choose(self, batch_size: int) -> DraftChoice:
        raise AssertionError("a strategy that takes rooms is asked with them")

    def observe(self, feedback: StepFeedback) -> None:
        self.feedback.append(feedback)

    def drafters_in_hand(self, batch_size: int, model_free: Sequence[str]) -> list[str]:
        return []

    def choose_with_drafts(
        self,
        batch_size: int,
        lengths: Mapping[str, Sequence[int]],
        rooms: Sequence[int] | None = None,
    ) -> DraftChoice:
        assert lengths == {}
        self.seen.append((batch_size, list(rooms or [])))
        return self.choice


def test_the_proposer_hands_each_batch_row_s_room_to_the_strategy() -> None:
    """Room: what max_tokens leaves after this step (up to k = 4). A row that reached its cap,
    or whose tokens this step include its EOS or a stop token, finishes now (vLLM drops its
    drafts): it is not in the batch the strategy chooses for, nor is a row mid-prefill."""
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=4),
        model_config=SimpleNamespace(max_model_len=64),
    )

    def request(max_tokens: int, eos: int | None = 2, stops: Sequence[int] = ()) -> Any:
        params = SimpleNamespace(
            max_tokens=max_tokens, extra_args=None, eos_token_id=eos, stop_token_ids=list(stops)
        )
        return SimpleNamespace(num_prompt_tokens=3, sampling_params=params, prompt_token_ids=[1])

    # Each row has 3 prompt tokens and 10 generated: room = max_tokens - 10 - 1, up to k = 4.
    requests = {
        "far": request(40),
        "near": request(12),
        "last": request(11),
        "capped": request(10),
        "prefill": request(40),
        "eos": request(40),
        "stop": request(40, stops=[9]),
        "ignore_eos": request(40, eos=None),
    }
    sampled = {
        "far": [5],
        "near": [5],
        "last": [5],
        "capped": [5],
        "prefill": [],  # mid-prefill: samples nothing yet, not in the batch
        "eos": [2],
        "stop": [9, 5],  # the stop token is accepted, the bonus token after it dropped
        "ignore_eos": [2],
    }
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=list(requests)), requests=requests)
    strategy = RecordsRooms()
    p = AdaptiveProposer(config)
    p.configure(runner, {}, strategy)  # type: ignore[arg-type]
    tokens = np.zeros((len(requests), 64), dtype=np.int64)
    lengths = np.asarray([3 if name == "prefill" else 13 for name in requests])
    drafts = p.propose(list(sampled.values()), lengths, tokens)
    assert drafts == [[]] * len(requests)
    assert strategy.seen == [(4, [4, 1, 0, 4])]
    # The record keeps this step's batch: every row that sampled a token.
    assert [(b, c) for _, b, c, *_ in p.choices] == [(7, NO_DRAFT)]


def test_positions_a_row_had_no_room_for_are_no_evidence() -> None:
    """Four rows asked for k = 4: two with room for 4 accepted all, two with room for 1
    accepted theirs. Position 1 was checked on two rows and accepted on both; counted the old
    way, the short rows read as rejections there and the rate halves."""
    from rlhfspec_workers.generation.draft_strategy import fold_feedback

    def feedback(trials: tuple[int, ...]) -> StepFeedback:
        return StepFeedback(
            choice=DraftChoice("draft_model", 4), batch_size=4, num_drafts=4,
            num_draft_tokens=10, num_accepted_tokens=10, accepted_per_pos=(4, 2, 2, 2),
            step_seconds=0.01, draft_seconds=0.0, rows_asked=4, trials_per_pos=trials,
        )  # fmt: skip

    room_aware, old = AcceptanceEstimator("draft_model"), AcceptanceEstimator("draft_model")
    fold_feedback(feedback((4, 2, 2, 2)), {"draft_model": room_aware})
    fold_feedback(feedback(()), {"draft_model": old})
    assert room_aware.trials[:4] == [4.0, 2.0, 2.0, 2.0]
    assert old.trials[:4] == [4.0, 4.0, 2.0, 2.0]
    assert room_aware.successes[:4] == old.successes[:4] == [4.0, 2.0, 2.0, 2.0]
    assert room_aware.rates(2)[1] > old.rates(2)[1]


@dataclass
class Sevens:
    """A drafter proposing token 7 up to each row's room."""

    name: str = "sevens"
    model_free: bool = False

    def propose(self, rows: Sequence[Any], k: int) -> list[list[int]]:
        return [[7] * min(k, r.max_k) for r in rows]

    def release(self, req_ids: Any) -> None:
        pass


def test_the_proposer_reports_trials_only_where_a_row_s_room_reached() -> None:
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=4),
        model_config=SimpleNamespace(max_model_len=64),
    )

    def request(max_tokens: int) -> Any:
        params = SimpleNamespace(
            max_tokens=max_tokens, extra_args=None, eos_token_id=2, stop_token_ids=[]
        )
        return SimpleNamespace(num_prompt_tokens=3, sampling_params=params, prompt_token_ids=[1])

    requests = {"wide": request(40), "narrow": request(12)}  # rooms 4 and 1 after 10 tokens
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=list(requests)), requests=requests)
    strategy = RecordsRooms(DraftChoice("sevens", 4))
    p = AdaptiveProposer(config)
    p.configure(runner, {"sevens": Sevens()}, strategy)  # type: ignore[arg-type]
    tokens = np.zeros((2, 64), dtype=np.int64)
    assert p.propose([[5], [5]], np.asarray([13, 13]), tokens) == [[7] * 4, [7]]
    # Every draft token accepted, plus the bonus token.
    p.propose([[7] * 5, [7] * 2], np.asarray([18, 15]), tokens)
    (seen,) = strategy.feedback
    assert seen.accepted_per_pos == (2, 1, 1, 1)
    assert seen.trials_per_pos == (2, 1, 1, 1)
    assert seen.rows_asked == 2
