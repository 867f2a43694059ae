"""Ours, replayed: the adaptive strategy itself driven through the hindsight replay.

Where it sits: the generation benchmark's oracle report (``benchmarks.hindsight_oracle``)
replays each iteration's shadow traces under every fixed strategy and the true oracle, with
step costs measured in the same run. This module replays the same traces under a fresh copy
of the strategy ``ours`` runs (the worker's ``AdaptiveStrategy``): every step it chooses for
the live batch, then observes what that step's drafts really got, as the proposer would
report it (``StepFeedback``: accepted tokens per position, and side drafts of the model-free
drafters it did not choose on a rotating window of rows). Timing noise then drops out of the
comparison: on identical batches and identical step costs, ours-replayed against the
oracle-replayed and the fixed configurations replayed is the selector's decision quality
alone, where measured runs of one configuration spread by ~10% on a shared 2-core machine.

The strategy also gets the fill of each drafter's drafts (how many rows got a draft, and
how long: the traces keep each longest draft's length, the live replay of the suffix drafters
their last call's), and its cost learner gets a step record per replayed step, charged what the
replay charged (``step_record``), as a worker's learner gets the engine's. What it does not
see is the engine's own spread: each replayed step of a strategy at a batch size costs the
mean of what fixed runs measured there, adjusted for the draft tokens it verifies
(``hindsight.charged_seconds``), as the oracle's and the fixed configurations' steps are.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rlhfspec_workers.benchmarks.hindsight_oracle import IterationTraces, measured_draft_cost
from rlhfspec_workers.generation.draft_strategy import (
    ChoosesWithDrafts,
    DraftChoice,
    DraftFill,
    DraftStrategy,
    ShadowEvidence,
    StepFeedback,
    count_verified_row,
)
from rlhfspec_workers.generation.proposer import SIDE_DRAFT_ROWS
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.hindsight import (
    OFF,
    Dynamic,
    Replay,
    SequenceTrace,
    Step,
    StepCost,
    Strategy,
    charged_seconds,
    replay,
)


@dataclass(frozen=True)
class ReplayOptions:
    """What the replayed proposer knows: its largest k, the response cap (a row's room for a
    draft, as the engine computes it from ``max_tokens``), which drafters draft on the side
    when not chosen (model-free ones) and what drafting measured."""

    max_k: int
    max_tokens: int
    side_drafters: tuple[str, ...] = ()
    draft_seconds: StepCost | None = None
    """(drafter, batch size, k) -> seconds a drafting call took in the fixed runs
    (``hindsight_oracle.measured_draft_cost``): what each replayed step reports as its
    drafting time, as a worker's step records do. None: reported as 0 (nothing measured)."""

    def with_drafting(
        self, runs: Iterable[tuple[str, Sequence[StepRecord]]], model: CostModel
    ) -> ReplayOptions:
        """These options reporting the drafting time ``runs`` (fixed-strategy runs)
        measured, the calibrated table filling what they did not run."""
        return replace(self, draft_seconds=measured_draft_cost(runs, model.draft_seconds))


def _proposed(step: Step, i: int, drafter: str, cap: int) -> int:
    """Tokens ``drafter`` proposes for row ``i`` when asked for ``cap``: its longest draft's
    length where recorded (``Step.draft_length``: a model-free drafter drafts only where it
    finds a match), else ``cap`` (a draft model always fills its draft)."""
    known = step.draft_length(i, drafter)
    return cap if known is None else min(cap, known)


def _room(options: ReplayOptions, pos: int) -> int:
    """Draft tokens a row with ``pos`` response tokens can take (the engine's max_tokens cap)."""
    return max(0, min(options.max_k, options.max_tokens - pos - 1))


def _fill(
    step: Step, rows: Sequence[int], drafter: str, k: int, options: ReplayOptions
) -> DraftFill | None:
    """``proposer.AdaptiveProposer._draft_fill`` for one drafter asked for ``k`` on ``rows``."""
    asked, got = [0] * k, [0] * k
    for i in rows:
        cap = min(k, _room(options, step.live[i][1]))
        made = _proposed(step, i, drafter, cap)
        for p in range(cap):
            asked[p] += 1
            got[p] += p < made
    return DraftFill(tuple(asked), tuple(got)) if k and asked[0] else None


def _asked_rows(step: Step, options: ReplayOptions) -> list[int]:
    """The rows with room for a draft (the ones the proposer asks)."""
    return [i for i, (_, pos) in enumerate(step.live) if _room(options, pos) > 0]


def _side_rows(step: Step, options: ReplayOptions, call: int) -> list[int]:
    """The proposer's rotating window of ``SIDE_DRAFT_ROWS`` rows with room."""
    rows = _asked_rows(step, options)
    if len(rows) > SIDE_DRAFT_ROWS:
        start = (call * SIDE_DRAFT_ROWS) % len(rows)
        rows = [rows[(start + j) % len(rows)] for j in range(SIDE_DRAFT_ROWS)]
    return rows


def _side_evidence(
    step: Step, strategy: Strategy, options: ReplayOptions, rows: Mapping[str, Sequence[int]]
) -> dict[str, ShadowEvidence]:
    """Side drafts scored as ``proposer.AdaptiveProposer._side_evidence`` scores them: position
    i is a trial when the row emitted more than i tokens, a success when the draft matched
    there too."""
    out: dict[str, ShadowEvidence] = {}
    for name in _side_drafters(strategy, options):
        trials, successes = [0] * options.max_k, [0] * options.max_k
        for i in rows[name]:
            matched = step.accepted(i, name, options.max_k)  # its draft's match, up to max_k
            emitted = step.advance(i, strategy)
            for p in range(min(options.max_k, emitted)):
                trials[p] += 1
                if p >= matched:
                    break
                successes[p] += 1
        if trials[0]:
            out[name] = ShadowEvidence(tuple(trials), tuple(successes))
    return out


def _side_drafters(strategy: Strategy, options: ReplayOptions) -> list[str]:
    chosen = strategy[0] if strategy[1] > 0 else None
    return [name for name in options.side_drafters if name != chosen]


def step_feedback(
    step: Step,
    strategy: Strategy,
    seconds: float,
    options: ReplayOptions,
    call: int,
    in_hand: Sequence[str] = (),
) -> StepFeedback:
    """What the proposer would report of one replayed step's drafts (their lengths: the
    step's, ``Step.draft_length``). ``in_hand``: the drafters that drafted for every row
    before the choice (their side drafts cover every row, not a window)."""
    drafter, k = strategy
    enabled = drafter != OFF and k > 0
    num_drafts = drafted = accepted = asked = 0
    per_pos, trials = [0] * (k if enabled else 0), [0] * (k if enabled else 0)
    fill: dict[str, DraftFill] = {}
    if enabled:
        for i, (_, pos) in enumerate(step.live):
            cap = min(k, _room(options, pos))
            if cap == 0:
                continue
            asked += 1
            proposed = _proposed(step, i, drafter, cap)
            ok = min(step.advance(i, strategy) - 1, proposed) if proposed else 0
            count_verified_row(per_pos, trials, cap, ok)
            if proposed:
                num_drafts += 1
                drafted += proposed
                accepted += ok
        chosen = _fill(step, range(len(step.live)), drafter, k, options)
        if chosen is not None:
            fill[drafter] = chosen
    window, every = _side_rows(step, options, call), _asked_rows(step, options)
    rows = {n: every if n in in_hand else window for n in _side_drafters(strategy, options)}
    for name in rows:
        side = _fill(step, rows[name], name, options.max_k, options)
        if side is not None:
            fill[name] = side
    return StepFeedback(
        choice=DraftChoice(drafter, k) if enabled else DraftChoice(OFF, 0),
        batch_size=len(step.live),
        num_drafts=num_drafts,
        num_draft_tokens=drafted,
        num_accepted_tokens=accepted,
        accepted_per_pos=tuple(per_pos),
        trials_per_pos=tuple(trials),
        step_seconds=seconds,
        draft_seconds=_drafting(options, drafter, len(step.live), k) if enabled else 0.0,
        shadow=_side_evidence(step, strategy, options, rows),
        fill=fill,
        rows_asked=asked,
    )


def _drafting(options: ReplayOptions, drafter: str, batch: int, k: int) -> float:
    return 0.0 if options.draft_seconds is None else options.draft_seconds(drafter, batch, k)


def step_record(index: int, feedback: StepFeedback, strategy: Strategy) -> StepRecord:
    """The engine's record of a replayed step, for the strategy's cost learner
    (``cost_learner.CostLearner``): B rows verified the step's drafts, and the step took what the
    replay charged for drafting and verifying them (so the record's next drafting is the
    same strategy's, which the learner takes off the step at the table's price), the
    drafting inside it what the fixed runs measured (``ReplayOptions.draft_seconds``)."""
    drafter, k = strategy
    return StepRecord(
        step=index,
        batch_size=feedback.batch_size,
        num_finished=0,
        drafter=drafter,
        k=k,
        num_drafts=feedback.num_drafts,
        num_draft_tokens=feedback.num_draft_tokens,
        num_accepted_tokens=feedback.num_accepted_tokens,
        accepted_per_pos=feedback.accepted_per_pos,
        drafted_per_pos=(),
        proposer_draft_tokens=feedback.num_draft_tokens,
        proposer_accepted_tokens=feedback.num_accepted_tokens,
        next_drafter=drafter,
        next_k=k,
        next_draft_tokens=feedback.num_draft_tokens,
        step_seconds=feedback.step_seconds,
        draft_seconds=feedback.draft_seconds,
    )


def _drafts_in_hand(
    strategy: DraftStrategy, step: Step, options: ReplayOptions
) -> dict[str, list[int]]:
    """As the proposer's ``_drafts_in_hand``: for each model-free drafter the strategy asks
    for, the length of its longest draft for each row with room."""
    if not isinstance(strategy, ChoosesWithDrafts):
        return {}
    names = strategy.drafters_in_hand(len(step.live), options.side_drafters)
    asked = _asked_rows(step, options)
    return {
        name: [_proposed(step, i, name, _room(options, step.live[i][1])) for i in asked]
        for name in names
        if name in options.side_drafters
    }


def replay_strategy(
    traces: Sequence[SequenceTrace],
    cost: StepCost,
    strategy: DraftStrategy,
    options: ReplayOptions,
    dynamic: Dynamic | None = None,
) -> Replay:
    """One batch replayed under ``strategy``: it chooses each step for the live batch and
    observes that step's outcome before choosing the next (its state carries over to the
    next call, as a worker's does from batch to batch), and where it has a cost learner
    (``observe_step``) it learns from each step, as a worker does. A dynamic drafter that
    keeps its last call's draft lengths (``shadow.LiveReplay.last_proposed``) lends them
    to the fill."""
    pending: list[tuple[Step, Strategy, float, tuple[str, ...]]] = []
    calls = 0
    learn = getattr(strategy, "observe_step", None)

    def settle() -> None:
        nonlocal calls
        if pending:
            step, chosen, seconds, in_hand = pending.pop()
            feedback = step_feedback(step, chosen, seconds, options, calls, in_hand)
            strategy.observe(feedback)
            if learn is not None:
                learn(step_record(calls, feedback, chosen))
            calls += 1

    def choose(step: Step) -> Strategy:
        settle()
        batch = len(step.live)
        in_hand = _drafts_in_hand(strategy, step, options)
        if isinstance(strategy, ChoosesWithDrafts):
            rooms = [_room(options, pos) for _, pos in step.live]
            choice = strategy.choose_with_drafts(batch, in_hand, rooms)
        else:
            choice = strategy.choose(batch)
        chosen: Strategy = (choice.drafter, choice.k) if choice.enabled else (OFF, 0)
        pending.append((step, chosen, charged_seconds(cost, step, chosen), tuple(in_hand)))
        return chosen

    result = replay(traces, cost, choose, dynamic)
    settle()
    return result


def replay_rounds(
    iterations: Sequence[IterationTraces],
    cost: StepCost,
    strategy: DraftStrategy,
    options: ReplayOptions,
    *,
    warmup: int = 1,
    rounds: int = 3,
) -> dict[str, Any]:
    """The benchmark's schedule for ``ours``, replayed: ``warmup`` unmeasured rounds, then
    ``rounds`` measured ones, each visiting every iteration's batch in turn with the same
    strategy object. Returns per round the tokens per second (a round's iterations together)
    and per iteration the median over rounds, and the measured rounds' strategy counts."""
    per_round: list[float] = []
    per_iteration: list[list[float]] = [[] for _ in iterations]
    choices: dict[str, int] = {}
    for r in range(warmup + rounds):
        tokens, seconds = 0, 0.0
        for i, batch in enumerate(iterations):
            result = replay_strategy(batch.traces, cost, strategy, options, batch.dynamic())
            if r < warmup:
                continue
            tokens, seconds = tokens + result.tokens, seconds + result.seconds
            per_iteration[i].append(result.tokens_per_second)
            for (d, k), n in result.choices.items():
                choices[f"{d}:{k}"] = choices.get(f"{d}:{k}", 0) + n
        if r >= warmup:
            per_round.append(tokens / seconds if seconds > 0 else 0.0)
    return {
        "tokens_per_second": round(statistics.median(per_round), 2) if per_round else 0.0,
        "rounds": [round(v, 2) for v in per_round],
        "iterations": [round(statistics.median(v), 2) if v else 0.0 for v in per_iteration],
        "choices": dict(sorted(choices.items(), key=lambda kv: -kv[1])),
    }


def ours_replayer(
    fresh: Callable[[], DraftStrategy],
    iterations: Sequence[IterationTraces],
    options: ReplayOptions,
    rounds: int,
) -> Callable[[StepCost], Mapping[str, Any]]:
    """``hindsight_oracle.add_oracle``'s hook: under the step costs it measured, a fresh
    strategy (``fresh()``, as ``ours`` started) replayed on the benchmark's schedule."""

    def run(cost: StepCost) -> Mapping[str, Any]:
        return replay_rounds(iterations, cost, fresh(), options, rounds=rounds)

    return run
