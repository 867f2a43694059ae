"""The benchmark's baseline strategies and the hindsight profile they are scored against.

Where it sits: ``benchmarks.generation`` runs every configuration on the same engines; the
ones that decide per step plug into the adaptive proposer as ``DraftStrategy``s:

* :class:`BanditStrategy`: TLT's bucketed epsilon-greedy bandit (``spec_decode.bandit``), fed the
  proposer's per-step feedback as its reward (accept length x batch / step time);
* :func:`oracle_schedule`: the hindsight oracle, the best measured strategy per batch-size
  bucket from the profile (:class:`Profile`) of every fixed-strategy run;
* :func:`hand_tuned_schedule`: what a user tuning vLLM's Dynamic SD by hand would write for
  one drafter (a few batch ranges, the best fixed k of each, from the same profile).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rlhfspec_workers.generation.draft_strategy import NO_DRAFT, OFF, DraftChoice, StepFeedback
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.spec_decode.bandit import BanditSelector, bucket_of
from rlhfspec_workers.spec_decode.draft_choice import BatchRange

Strategy = tuple[str, int]


class BanditStrategy:
    """``BanditSelector`` as a per-step drafting strategy."""

    def __init__(self, bandit: BanditSelector) -> None:
        self.bandit = bandit

    def choose(self, batch_size: int) -> DraftChoice:
        if batch_size < 1:
            return NO_DRAFT
        scored = self.bandit.select(batch_size)
        return scored.strategy if scored.enabled else NO_DRAFT

    def observe(self, feedback: StepFeedback) -> None:
        if feedback.batch_size < 1 or feedback.step_seconds <= 0:
            return
        arm: Strategy = (feedback.choice.drafter, feedback.choice.k)
        if not feedback.choice.enabled:
            arm = (OFF, 0)
        # Tokens each sequence emitted: one, plus its accepted drafts.
        accept_length = 1.0 + feedback.num_accepted_tokens / feedback.batch_size
        self.bandit.observe(feedback.batch_size, arm, accept_length, feedback.step_seconds)


def buckets(max_batch: int) -> list[tuple[int, int]]:
    """Power-of-two batch ranges (1, 2, 3-4, 5-8, ...) up to max_batch: ``bucket_of``'s."""
    out: list[tuple[int, int]] = []
    lo = 1
    while lo <= max_batch:
        hi = bucket_of(lo)
        out.append((lo, min(hi, max_batch)))
        lo = hi + 1
    return out


@dataclass
class Profile:
    """Measured emitted tokens and seconds per (strategy, batch bucket), from step records of
    runs that used one strategy throughout."""

    cells: dict[tuple[Strategy, int], list[float]] = field(default_factory=dict)
    """(strategy, bucket hi) -> [tokens, seconds]."""

    def add(self, strategy: Strategy, records: Sequence[StepRecord]) -> None:
        """Decode steps of one run (the benchmark measures after prefill)."""
        for r in records:
            if r.batch_size < 1:
                continue
            cell = self.cells.setdefault((strategy, bucket_of(r.batch_size)), [0.0, 0.0])
            cell[0] += r.batch_size + r.num_accepted_tokens
            cell[1] += r.step_seconds

    def tokens_per_second(self, strategy: Strategy, bucket_hi: int) -> float:
        tokens, seconds = self.cells.get((strategy, bucket_hi), (0.0, 0.0))
        return tokens / seconds if seconds > 0 else 0.0

    @property
    def strategies(self) -> list[Strategy]:
        return sorted({s for s, _ in self.cells})

    def best(self, bucket_hi: int, among: Iterable[Strategy] | None = None) -> Strategy:
        pool = list(among) if among is not None else self.strategies
        measured = [s for s in pool if (s, bucket_hi) in self.cells]
        if not measured:
            return (OFF, 0)
        return max(measured, key=lambda s: (self.tokens_per_second(s, bucket_hi), -s[1]))


def oracle_schedule(profile: Profile, max_batch: int) -> list[BatchRange]:
    """Best measured strategy per bucket (any drafter, any k, or off): a ``BatchSizeStrategy``
    table."""
    table = []
    for lo, hi in buckets(max_batch):
        drafter, k = profile.best(bucket_of(hi))
        table.append(BatchRange(lo, hi, drafter, k))
    return table


def hand_tuned_schedule(
    profile: Profile,
    drafter: str,
    ranges: Sequence[tuple[int, int]],
) -> list[tuple[int, int, int]]:
    """vLLM ``num_speculative_tokens_per_batch_size`` rows ``[lo, hi, k]`` for one drafter: in
    each (coarse) range, the k whose fixed run was fastest over that range's steps."""
    rows = []
    ks = sorted({k for d, k in profile.strategies if d in (drafter, OFF)})
    for lo, hi in ranges:
        inside = sorted({bucket_of(b) for b in range(lo, hi + 1)})

        def score(k: int, inside: list[int] = inside) -> float:
            strategy: Strategy = (OFF, 0) if k == 0 else (drafter, k)
            tokens = sum(profile.cells.get((strategy, b), (0.0, 0.0))[0] for b in inside)
            seconds = sum(profile.cells.get((strategy, b), (0.0, 0.0))[1] for b in inside)
            return tokens / seconds if seconds > 0 else 0.0

        rows.append((lo, hi, max(ks, key=lambda k: (score(k), -k)) if ks else 0))
    return rows
