"""Drafts in hand: a model-free drafter's acceptance for one step, read off the drafts it
has already made for that step.

Place in the flow: before choosing, the adaptive proposer (``generation.proposer``) can let
the model-free drafters (suffix, n-gram) draft for every row, since a lookup costs little
next to a verification step; the strategy (``generation.adaptive``) then scores each of them
with :class:`DraftsInHand` instead of its usual estimate. Why: a model-free drafter drafts
only where it finds a match, and how many rows have one, and how long, changes from step to
step (the suffix drafter finds nothing at a batch's start and matches everywhere once
siblings finish). The usual estimate averages that into a mean fill; the lengths in hand are
this step's exact fill. On the tiny bench's shadow batch, a greedy selector with the batch's
own average acceptance got 0.86x the true oracle with the mean fill and 0.92-0.93x with the
fill in hand: the step's fill was worth ~8%.

Acceptance given a draft: the estimator's rates count a row asked for a draft that got none,
or got a shorter one, as rejected there (``draft_strategy.SelectorStrategy``), so the rate at
position i is (share of rows whose draft reaches i) x (acceptance there given it does). With
``fill_rates`` f_i (share of rows asked whose draft has more than i tokens), the rate given a
draft is r_i / f_i at i = 0 and r_i f_{i-1} / f_i deeper (reaching i given i - 1).

Rows without room: :class:`RoomLimited` scores any drafter on the batch's rooms (how many draft
tokens each row can still take before its cap), which the proposer also knows before it
chooses. Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class FilledAcceptance(Protocol):
    """An acceptance model that also knows its fill (``AcceptanceEstimator``,
    ``phased.PhasedAcceptance``)."""

    def rates(self, k: int) -> list[float]: ...

    def fill_rates(self, k: int) -> list[float]: ...


def rates_given_a_draft(model: FilledAcceptance, k: int) -> list[float]:
    """Conditional acceptance at positions 0..k-1 of a row whose draft reaches there."""
    out: list[float] = []
    before = 1.0
    for r, f in zip(model.rates(k), model.fill_rates(k), strict=True):
        reach = f / before if before > 0 else 0.0
        out.append(min(1.0, r / reach) if reach > 0 else 0.0)
        before = f
    return out


@dataclass(frozen=True)
class DraftsInHand:
    """One step's acceptance model of a drafter whose drafts are made: ``lengths`` are the
    drafts' lengths, one per row asked (a row with no room left is not asked), and the
    selector's rows are the batch. Rows beyond ``lengths`` (none asked) count as no draft."""

    given_a_draft: tuple[float, ...]
    """Acceptance at each position of a draft that reaches it (:func:`rates_given_a_draft`)."""
    lengths: tuple[int, ...]
    batch_size: int
    _counts: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    """(length, rows with a draft that long), from ``lengths``."""

    @classmethod
    def of(
        cls, model: FilledAcceptance, lengths: Sequence[int], batch_size: int, max_k: int
    ) -> DraftsInHand:
        return cls(tuple(rates_given_a_draft(model, max_k)), tuple(lengths), batch_size)

    def __post_init__(self) -> None:
        # The selector asks for every k of a step; counting the lengths once makes each ask
        # cost max_k, not the batch.
        counts: dict[int, int] = {}
        for n in self.lengths:
            counts[n] = counts.get(n, 0) + 1
        object.__setattr__(self, "_counts", tuple(sorted(counts.items())))

    def expected_accepted(self, k: int) -> float:
        """Expected accepted tokens per row of the batch when k are verified."""
        prefix, run = [0.0], 1.0
        for p in self.given_a_draft[:k]:
            run *= p
            prefix.append(prefix[-1] + run)
        top = min(k, len(prefix) - 1)
        total = sum(rows * prefix[min(top, n)] for n, rows in self._counts)
        return total / max(self.batch_size, 1)

    def expected_draft_tokens(self, k: int) -> float:
        """Tokens per row of the batch that verification checks when k are asked for."""
        return sum(rows * min(k, n) for n, rows in self._counts) / max(self.batch_size, 1)


class _Acceptance(Protocol):
    def expected_accepted(self, k: int) -> float: ...


@dataclass(frozen=True)
class RoomLimited:
    """A drafter's acceptance on a batch whose rows have limited room: a row ``r`` tokens
    short of its cap takes a draft of at most ``r - 1`` tokens (the verifying step emits one
    more), and a row with none left takes no draft. The estimators count per row asked (a
    row with room), while the selector multiplies by the whole batch: without this, rows
    finishing on their cap count as full drafts. On the tiny bench only 69-86% of the rows
    the selector counted had a draft verified, so it expected up to 1.4x the acceptance it
    could get, most in the long tail where few rows are left and most are near their cap.

    ``rooms[c]``: rows of the batch that can take c draft tokens, c = 0..max_k (the last
    count also holds rows with more room than max_k)."""

    model: _Acceptance
    rooms: tuple[int, ...]

    @classmethod
    def of(cls, model: _Acceptance, row_rooms: Sequence[int], max_k: int) -> RoomLimited:
        counts = [0] * (max_k + 1)
        for room in row_rooms:
            counts[min(max(room, 0), max_k)] += 1
        return cls(model, tuple(counts))

    @property
    def batch_size(self) -> int:
        return sum(self.rooms)

    def expected_accepted(self, k: int) -> float:
        """Expected accepted tokens per row of the batch when k are asked for."""
        total = sum(
            n * self.model.expected_accepted(min(k, c)) for c, n in enumerate(self.rooms) if n and c
        )
        return total / max(self.batch_size, 1)

    def expected_draft_tokens(self, k: int) -> float:
        """Tokens per row of the batch that verification checks when k are asked for: a
        row's draft is cut to its room, and a drafter that knows its fill fills that."""
        fill = getattr(self.model, "expected_draft_tokens", None)
        total = 0.0
        for c, n in enumerate(self.rooms):
            if n and c:
                j = min(k, c)
                total += n * (min(float(j), max(0.0, float(fill(j)))) if fill else float(j))
        return total / max(self.batch_size, 1)
