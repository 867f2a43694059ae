"""Acceptance by batch phase: a drafter's pooled estimate, refined where the batch is now.

Place in the flow: the adaptive strategy (``generation.adaptive``) keeps, beside each
drafter's pooled `AcceptanceEstimator`, one evidence-only estimator per batch phase (a range
of batch sizes) and hands the selector a `PhasedAcceptance` for the phase of the batch it is
choosing for. Why: in an RL batch, acceptance depends on where the batch is. At its start
every row is young and no sibling has written anything (a draft model accepts well, a
suffix drafter finds nothing); as it drains, the rows left are the stragglers (long, often
wrong answers: a draft model accepts less) while the finished siblings feed the suffix
drafter. One estimate per drafter averages the phases into a wrong answer for each (tiny
bench: the draft model's pooled estimate stood at 0.55 at position 1 where a batch's first
steps accept ~0.85, so it was never chosen there).

Estimate: each position's conditional rate is the phase's own evidence shrunk towards the
pooled rate by `strength` drafts (a phase with little evidence says what the drafter says
overall), plus `z` posterior standard deviations of optimism, so a phase where a drafter was
never tried gets tried once before the pooled estimate is believed there. Pure Python.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .acceptance import AcceptanceEstimator, expected_accepted_from_rates

PHASE_BOUNDS = (2, 4, 8, 16, 32, 48)
"""Upper batch sizes of the phases 1-2, 3-4, 5-8, 9-16, 17-32, 33-48; 49 and more is the last."""


PREFIX_FLOOR = 8
"""Positions computed on a first ask for rates, whatever k it asks for."""


def phase_of(batch_size: int) -> int:
    """The phase index of a batch size (0 for 1-2 rows, ..., len(PHASE_BOUNDS) past 48)."""
    return bisect.bisect_left(PHASE_BOUNDS, batch_size)


@dataclass(frozen=True)
class PhasedAcceptance:
    """What the selector reads for one drafter in one phase (an ``AcceptanceModel``)."""

    pooled: AcceptanceEstimator
    phase: AcceptanceEstimator
    """Evidence of this phase only (its prior is not used: the pooled estimate is)."""
    strength: float = 16.0
    z: float = 1.0
    _memo: dict[str, list[float]] = field(default_factory=dict, compare=False, repr=False)
    _accepted: dict[int, float] = field(default_factory=dict, compare=False, repr=False)
    """Rates and expectations already computed: the selector reads the same ones a few dozen
    times a step, and the estimators do not change while it chooses (one of these lives for
    one choice)."""

    def rates(self, k: int) -> list[float]:
        return self._prefix("rates", k, self._rates)

    def _prefix(self, what: str, k: int, compute: Callable[[int], list[float]]) -> list[float]:
        """``compute(k)``, from the longest one computed: position i of every one of these
        rate lists depends only on positions up to i, so a shorter k is a prefix."""
        cached = self._memo.get(what)
        if cached is None or len(cached) < k:
            # The selector asks k = 1, 2, 4, 8 in turn: start at the usual longest.
            cached = self._memo[what] = compute(max(k, PREFIX_FLOOR))
        return cached[:k]

    def _rates(self, k: int) -> list[float]:
        out = []
        for i, prior in enumerate(self.pooled.rates(k)):
            s = self.phase.successes[i] if i < len(self.phase.successes) else 0.0
            n = self.phase.trials[i] if i < len(self.phase.trials) else 0.0
            p = (self.strength * prior + s) / (self.strength + n)
            sd = math.sqrt(max(p * (1.0 - p), 0.0) / (self.strength + n + 1.0))
            out.append(min(1.0, p + self.z * sd))
        return out

    def expected_accepted(self, k: int) -> float:
        cached = self._accepted.get(k)
        if cached is None:
            cached = self._accepted[k] = expected_accepted_from_rates(self.rates(k))
        return cached

    def expected_draft_tokens(self, k: int) -> float:
        return sum(self._pooled_fill(k))

    def _pooled_fill(self, k: int) -> list[float]:
        return self._prefix("pooled_fill", k, self.pooled.fill_rates)

    def fill_rates(self, k: int) -> list[float]:
        """The phase's fill, shrunk towards the pooled fill as :meth:`rates` are: the rates
        here count rows without a draft as rejections, in the phase's own proportion, so
        ``spec_decode.in_hand`` must divide them by that phase's fill, not the pooled one."""
        return self._prefix("fill", k, self._fill_rates)

    def _fill_rates(self, k: int) -> list[float]:
        out = []
        for i, prior in enumerate(self._pooled_fill(k)):
            n = self.phase.fill_asked[i] if i < len(self.phase.fill_asked) else 0.0
            g = self.phase.fill_got[i] if i < len(self.phase.fill_got) else 0.0
            out.append((self.strength * prior + g) / (self.strength + n))
        return out
