"""The true hindsight oracle: replay a generation batch under any drafting schedule.

Where it sits: the generation benchmark (``benchmarks.generation``) runs the batch once with
plain decoding while every drafter proposes its longest draft for every sequence at every
position on the side (``generation.shadow``). Because every drafter here proposes
deterministic tokens (probability one on each), vLLM's lossless verification accepts a
proposed token exactly when it equals the token the target samples there; so the number of
leading draft tokens equal to what the sequence really went on to generate *is* the accepted
length, in distribution, had that draft been verified. With those match lengths for every
(sequence, position, drafter), this module replays the batch step by step under any schedule:
each live sequence advances by one plus the accepted part of its draft, the batch shrinks as
sequences end, and each step costs what the measured cost table says for the draft tokens it
verifies (:meth:`MeasuredCost.for_tokens`: a model-free drafter drafts only where it finds a
match, so the same strategy at the same batch size verifies more or fewer tokens).

:func:`replay_oracle` picks, at every step, the (drafter, k) knowing each drafter's real
acceptance there: the ceiling of any per-step selector that applies one strategy to the whole
batch. Every schedule emits the same tokens, so the best schedule is the one that takes the
least time. Picking the most tokens per second *for each step* alone does not always get it:
in the long tail a step's rate matters less than how far the stragglers get, and a greedy
oracle lost 3% to another schedule on the tiny bench. So, once the batch has drained to
``LOOKAHEAD_BATCH`` sequences, the oracle looks ahead (a rollout): it tries every strategy for
the step, completes the batch greedily after each, and takes the one that finishes soonest,
which can never end later than the greedy schedule. Pure Python (no numpy, no torch).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from rlhfspec_workers.spec_decode.cost_records import OFF as OFF  # re-exported

Strategy = tuple[str, int]
StepCost = Callable[[str, int, int], float]
"""(drafter, batch size, k) -> seconds of one engine step (draft + verify)."""


@dataclass(frozen=True)
class SequenceTrace:
    """One sample of the shadow run."""

    key: str
    start: int
    """Response tokens it had when decoding started (1: the token prefill sampled)."""
    length: int
    """Response tokens at the end."""
    matches: Mapping[str, Sequence[int]]
    """drafter -> for each position ``start + i``, how many leading tokens of the draft that
    drafter proposed there (at most the longest k) equal the tokens that followed. Only for
    drafters whose draft depends on the sequence's own prefix alone (n-gram, a draft model)."""

    proposed: Mapping[str, Sequence[int]] = field(default_factory=dict)
    """drafter -> for each position, how many tokens that longest draft had (a model-free
    drafter proposes only where it finds a match); absent: not recorded."""

    def matched(self, drafter: str, position: int) -> int:
        row = self.matches.get(drafter, ())
        i = position - self.start
        return row[i] if 0 <= i < len(row) else 0

    def proposed_length(self, drafter: str, position: int) -> int | None:
        """Tokens of the longest draft ``drafter`` made at ``position`` (None: unknown)."""
        row = self.proposed.get(drafter)
        i = position - self.start
        return row[i] if row is not None and 0 <= i < len(row) else None


Live = Sequence[tuple[SequenceTrace, int]]
"""The sequences still running at a step, each with its response length so far."""
Dynamic = Callable[[Live], Mapping[str, Sequence[int]]]
"""For drafters whose drafts depend on the schedule (the suffix drafter reads how far the
siblings have got): drafter -> match length of each live sequence's draft at this step."""


class Forkable(Protocol):
    """A :data:`Dynamic` that can be copied mid-replay (the oracle's lookahead)."""

    def __call__(self, live: Live) -> Mapping[str, Sequence[int]]: ...

    def fork(self) -> Forkable:
        """A copy in the same state, for a branch of the schedule from here on."""
        ...


LOOKAHEAD_BATCH = 16
"""Live sequences at or below which the oracle looks ahead. Above it every sequence is
still running and a step's rate is what counts; below it the tail decides, and the
lookahead's cost (a greedy completion per strategy per step) is small."""


@dataclass(frozen=True)
class Step:
    """One replayed step: who is live, and what each drafter would get accepted."""

    live: Live
    dynamic: Mapping[str, Sequence[int]]
    proposed: Mapping[str, Sequence[int]] = field(default_factory=dict)
    """For the drafters of ``dynamic`` that say so (``LiveReplay.last_proposed``): the length
    of each live sequence's draft at this step."""

    def drafted(self, strategy: Strategy) -> int | None:
        """Draft tokens this step verifies under ``strategy``, where the drafter's draft
        lengths are known (a model-free drafter drafts only where it finds a match); None
        where they are not (a draft model always fills its k)."""
        drafter, k = strategy
        if drafter == OFF or k <= 0:
            return 0
        total = 0
        for i in range(len(self.live)):
            made = self.draft_length(i, drafter)
            if made is None:
                return None
            total += min(k, made)
        return total

    def draft_length(self, i: int, drafter: str) -> int | None:
        """Tokens of the longest draft ``drafter`` made for live sequence ``i`` at this step:
        the live replay's where it drafted, else the trace's; None where neither recorded it."""
        row = self.proposed.get(drafter)
        if row is not None:
            return int(row[i])
        seq, pos = self.live[i]
        return seq.proposed_length(drafter, pos)

    def accepted(self, i: int, drafter: str, k: int) -> int:
        if k <= 0 or drafter == OFF:
            return 0
        seq, pos = self.live[i]
        row = self.dynamic.get(drafter)
        return min(k, row[i] if row is not None else seq.matched(drafter, pos))

    def advance(self, i: int, strategy: Strategy) -> int:
        """Tokens sequence ``i`` emits: one plus what it accepts, never past its end."""
        seq, pos = self.live[i]
        return min(1 + self.accepted(i, *strategy), seq.length - pos)

    def gain(self, strategy: Strategy) -> int:
        return sum(self.advance(i, strategy) for i in range(len(self.live)))


@dataclass
class Replay:
    """A schedule replayed over a batch."""

    tokens: int = 0
    accepted: int = 0
    """Draft tokens accepted (tokens minus one per sequence per step)."""
    seconds: float = 0.0
    steps: int = 0
    choices: Counter[Strategy] = field(default_factory=Counter)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


Chooser = Callable[[Step], Strategy]


def replay(
    traces: Iterable[SequenceTrace],
    cost: StepCost,
    choose: Chooser,
    dynamic: Dynamic | None = None,
) -> Replay:
    """Step the batch until every sequence ends; ``choose`` picks each step's strategy.
    ``dynamic`` must be fresh per replay (it tracks the schedule it is replaying)."""
    live = [(seq, seq.start) for seq in traces if seq.length > seq.start]
    return _run(live, cost, choose, dynamic)


def _run(
    live: list[tuple[SequenceTrace, int]],
    cost: StepCost,
    choose: Chooser,
    dynamic: Dynamic | None,
) -> Replay:
    out = Replay()
    while live:
        step = _step(live, dynamic)
        strategy = choose(step)
        out.seconds += charged_seconds(cost, step, strategy)
        out.steps += 1
        out.choices[strategy] += 1
        nxt = []
        for i, (seq, pos) in enumerate(live):
            emitted = step.advance(i, strategy)
            out.tokens += emitted
            out.accepted += emitted - 1
            if pos + emitted < seq.length:
                nxt.append((seq, pos + emitted))
        live = nxt
    return out


def _step(live: Live, dynamic: Dynamic | None) -> Step:
    if dynamic is None:
        return Step(live, {})
    matches = dynamic(live)
    lengths = getattr(dynamic, "last_proposed", None)
    return Step(live, matches, dict(lengths) if isinstance(lengths, Mapping) else {})


def charged_seconds(cost: StepCost, step: Step, strategy: Strategy) -> float:
    """What a replay charges ``step`` under ``strategy``: a :class:`MeasuredCost` prices the
    draft tokens the step really verifies (:meth:`MeasuredCost.for_tokens`), any other cost
    the strategy at the step's batch size."""
    drafter, k = _key(*strategy)
    batch = len(step.live)
    if isinstance(cost, MeasuredCost):
        return cost.for_tokens(drafter, batch, k, step.drafted((drafter, k)))
    return cost(drafter, batch, k)


def replay_fixed(
    traces: Iterable[SequenceTrace],
    cost: StepCost,
    strategy: Strategy,
    dynamic: Dynamic | None = None,
) -> Replay:
    return replay(traces, cost, lambda step: strategy, dynamic)


def _pool(strategies: Sequence[Strategy]) -> list[Strategy]:
    """Plain decoding and every drafting strategy: what an oracle chooses from."""
    return [(OFF, 0), *[s for s in strategies if s[0] != OFF and s[1] > 0]]


def replay_oracle(
    traces: Iterable[SequenceTrace],
    cost: StepCost,
    strategies: Sequence[Strategy],
    dynamic: Forkable | None = None,
    *,
    lookahead_batch: int = LOOKAHEAD_BATCH,
    choose_cost: StepCost | None = None,
) -> Replay:
    """Per step, the strategy with the most tokens per second given the real acceptance; at
    or below ``lookahead_batch`` live sequences (0: never), the one whose greedy completion
    finishes the batch soonest (the greedy choice first, so ties keep it). The oracle judges
    by ``choose_cost`` where given (costs measured apart from those it is charged: how much
    of its edge is the measurements' noise, ``benchmarks.oracle_curse``), else by ``cost``."""
    pool = _pool(strategies)
    judge = cost if choose_cost is None else choose_cost

    def greedy(step: Step) -> Strategy:
        return max(pool, key=lambda s: (step.gain(s) / charged_seconds(judge, step, s), -s[1]))

    def finish_seconds(step: Step, strategy: Strategy) -> float:
        after = []
        for i, (seq, pos) in enumerate(step.live):
            moved = pos + step.advance(i, strategy)
            if moved < seq.length:
                after.append((seq, moved))
        branch = dynamic.fork() if dynamic is not None else None
        rest = _run(after, judge, greedy, branch).seconds if after else 0.0
        return charged_seconds(judge, step, strategy) + rest

    def rollout(step: Step) -> Strategy:
        base = greedy(step)
        if len(step.live) > lookahead_batch:
            return base
        options = [base, *(s for s in pool if s != base)]
        return min(options, key=lambda s: finish_seconds(step, s))

    return replay(traces, cost, rollout, dynamic)


Expected = Callable[[Step], Mapping[str, Sequence[Sequence[float]]]]
"""For a step: drafter -> for each live sequence, the expected accepted tokens of that
drafter's draft there when ``k`` of it is verified, for k = 0, 1, .., len(draft) (entry 0 is
0.0). With deterministic drafts, verification accepts draft token j with the target's
probability of it given the context and the draft before it, so the expectation is
``sum over j <= k of prod over i <= j of p_i``."""


def replay_expected_oracle(
    traces: Iterable[SequenceTrace],
    cost: StepCost,
    strategies: Sequence[Strategy],
    expected: Expected,
    dynamic: Dynamic | None = None,
) -> Replay:
    """Per step, the strategy with the most *expected* tokens per second, each draft's
    acceptance known in expectation (the target's own probabilities of its tokens), then
    scored on what the drafts really got, as :func:`replay_oracle` is.

    This is the most any causal selector could know before verifying: the true oracle also
    knows which way each draw went, which no selector can. The ratio of the two is the ceiling
    of "ours vs the oracle". ``expected`` is called after ``dynamic`` in each step (it may
    read the drafts the live replay just made)."""
    pool = _pool(strategies)

    def best(step: Step) -> Strategy:
        curves = expected(step)

        def gain(strategy: Strategy) -> float:
            drafter, k = strategy
            rows = curves.get(drafter) if k > 0 else None
            total = 0.0
            for i, (seq, pos) in enumerate(step.live):
                curve = rows[i] if rows is not None else (0.0,)
                total += min(1.0 + curve[min(k, len(curve) - 1)], seq.length - pos)
            return total

        return max(pool, key=lambda s: (gain(s) / charged_seconds(cost, step, s), -s[1]))

    return replay(traces, cost, best, dynamic)


def match_length(draft: Sequence[int], actual: Sequence[int]) -> int:
    """Leading tokens of ``draft`` equal to ``actual`` (the tokens really generated next)."""
    n = 0
    for a, b in zip(draft, actual, strict=False):
        if a != b:
            break
        n += 1
    return n


def _key(drafter: str, k: int) -> Strategy:
    return (OFF, 0) if drafter == OFF or k <= 0 else (drafter, k)


def _interpolate(points: Sequence[tuple[int, float]], batch: int) -> float:
    """Piecewise-linear in batch size between measured sizes; the nearest one outside."""
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, s0), (b1, s1) in itertools.pairwise(points):
        if batch <= b1:
            return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)
    return points[-1][1]


class StepTiming(NamedTuple):
    """One measured step of a fixed-strategy run."""

    strategy: Strategy
    """What the step verified."""
    batch: int
    seconds: float
    drafted: int | None = None
    """Draft tokens it verified in all (None: not recorded)."""


class MeasuredCost:
    """Step seconds per (strategy, batch size) as measured (a :data:`StepCost`): per strategy,
    the mean seconds at each measured batch size, interpolated between them; ``fallback``
    (the calibrated cost model) for a strategy never measured. Measured beats modelled here:
    the oracle must be scored in the same currency as the runs it is compared with.

    A model-free drafter drafts only where it finds a match, so its steps at one batch size
    verify anywhere from none to k draft tokens a row, and a mean over a fixed run's steps
    prices them all at that run's mean fill. A schedule that uses the drafter only where it
    has drafts would then be charged less than its steps cost, and one that cuts drafts
    short credited nothing for it. With ``token_seconds`` (the marginal verification seconds
    of one more draft token at a batch size, from the calibrated cost model),
    :meth:`for_tokens` charges a step for the draft tokens it really verifies."""

    def __init__(
        self,
        records: Iterable[StepTiming],
        fallback: StepCost,
        token_seconds: Callable[[int], float] | None = None,
    ):
        sums: dict[Strategy, dict[int, list[float]]] = {}
        fills: dict[Strategy, dict[int, list[float]]] = {}
        for record in records:
            if record.batch < 1:
                continue
            strategy = _key(*record.strategy)
            cell = sums.setdefault(strategy, {}).setdefault(record.batch, [0.0, 0.0])
            cell[0] += record.seconds
            cell[1] += 1
            if record.drafted is not None and strategy[1] > 0:
                fill = fills.setdefault(strategy, {}).setdefault(record.batch, [0.0, 0.0])
                fill[0] += record.drafted
                fill[1] += 1
        self.curves: dict[Strategy, list[tuple[int, float]]] = _means(sums)
        """strategy -> (batch size, mean seconds) for every batch size measured."""
        self.fills: dict[Strategy, list[tuple[int, float]]] = _means(fills)
        """strategy -> (batch size, mean draft tokens verified) where recorded."""
        self.counts: dict[Strategy, dict[int, int]] = {
            strategy: {b: int(n) for b, (_, n) in cells.items()} for strategy, cells in sums.items()
        }
        self.fallback = fallback
        self.token_seconds = token_seconds

    def __call__(self, drafter: str, batch: int, k: int) -> float:
        curve = self.curves.get(_key(drafter, k))
        return _interpolate(curve, batch) if curve else self.fallback(drafter, batch, k)

    def for_tokens(self, drafter: str, batch: int, k: int, drafted: int | None) -> float:
        """A step of (drafter, k) at ``batch`` rows that verifies ``drafted`` draft tokens:
        the measured mean there, plus the marginal verification cost of the draft tokens
        above (or below) what the measured steps there verified on average; never below
        plain decoding at that batch size (or the measured mean, if that is lower). Without a
        token count, a recorded fill or ``token_seconds``: the measured mean."""
        base = self(drafter, batch, k)
        fill = self.fills.get(_key(drafter, k))
        if drafted is None or self.token_seconds is None or not fill:
            return base
        priced = base + self.token_seconds(batch) * (drafted - _interpolate(fill, batch))
        return max(min(base, self(OFF, batch, 0)), priced)


def _means(
    cells: Mapping[Strategy, Mapping[int, list[float]]],
) -> dict[Strategy, list[tuple[int, float]]]:
    return {
        strategy: sorted((b, total / n) for b, (total, n) in by_batch.items())
        for strategy, by_batch in cells.items()
    }


def step_cost_table(
    records: Iterable[StepTiming],
    fallback: StepCost,
    token_seconds: Callable[[int], float] | None = None,
) -> MeasuredCost:
    return MeasuredCost(records, fallback, token_seconds)
