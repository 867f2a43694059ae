"""A worker's predicted remaining work and how long it takes to drain.

Where it sits: the planner builds one `RemainingProfile` per worker from the length
predictor's view of each sample and asks it for the worker's drain time under the worker's
`ThroughputModel`; moves are evaluated by adding and removing samples' entries.

The speed model is "fluid": a worker running B samples advances every one of them by
tokens_per_step(B) tokens every step_seconds(B) seconds; between two finishes B is constant, so
draining a set of remaining lengths has a closed form over their sorted values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .model import ThroughputModel

_BIN_RATIO = math.log(1.05)
_EMPTY = 1e-9


def _bin_of(remaining: float) -> int:
    return 0 if remaining < 1.0 else 1 + int(math.log(remaining) / _BIN_RATIO)


class RemainingProfile:
    """A worker's predicted work: expected number of samples still running after v more tokens.

    Each sample enters as weighted points (its predicted remaining tokens, or values across the
    bands of its remaining-length distribution), kept in 5%-wide logarithmic bins with
    their weighted mean, so a worker of hundreds of samples drains in ~100 operations and a
    single point keeps its exact value.
    """

    __slots__ = ("_mass", "_weight")

    def __init__(self) -> None:
        self._weight: dict[int, float] = {}
        self._mass: dict[int, float] = {}

    @staticmethod
    def entries(
        values: Sequence[float], weights: Sequence[float] | None = None
    ) -> tuple[tuple[int, float, float], ...]:
        """One sample as (bin, probability, probability x value) triples, ready for `add`:
        `weights` are normalised (None: equally likely). Callers cache these per prediction."""
        if not values:
            raise ValueError("a sample needs at least one predicted value")
        ws = [1.0] * len(values) if weights is None else [float(x) for x in weights]
        if len(ws) != len(values) or min(ws) < 0.0 or sum(ws) <= 0.0:
            raise ValueError("weights must match values, be >= 0 and not all 0")
        total = sum(ws)
        out = []
        for v, pw in zip(values, ws, strict=True):
            v = max(float(v), 0.0)
            out.append((_bin_of(v), pw / total, pw / total * v))
        return tuple(out)

    def add(self, entries: Sequence[tuple[int, float, float]], sign: float = 1.0) -> None:
        """Add (sign=+1) or remove (sign=-1) one sample given by `entries`."""
        weights, mass = self._weight, self._mass
        for b, w, m in entries:
            weight = weights.get(b, 0.0) + sign * w
            if -_EMPTY < weight < _EMPTY:
                weights.pop(b, None)
                mass.pop(b, None)
            else:
                weights[b] = weight
                mass[b] = mass.get(b, 0.0) + sign * m

    def add_values(
        self, values: Sequence[float], weights: Sequence[float] | None = None, sign: float = 1.0
    ) -> None:
        """`add` from raw predicted values (and their probabilities)."""
        self.add(self.entries(values, weights), sign)

    def copy(self) -> RemainingProfile:
        out = RemainingProfile()
        out._weight = dict(self._weight)
        out._mass = dict(self._mass)
        return out

    @property
    def samples(self) -> float:
        return sum(self._weight.values())

    def drain_seconds(
        self, speed: ThroughputModel, *, capacity: int | None = None, cutoff: float = 0.5
    ) -> float:
        """Time until fewer than `cutoff` samples are expected to be left (0.5 ~ the median of
        the worker's last finish). Between points the expected batch B is constant and every
        running sample gains a token each `spt(B)` seconds; past `capacity`, samples share the
        slots (B / capacity x spt(capacity)), the fluid picture of a queue."""
        b_left = sum(self._weight.values())
        t, prev = 0.0, 0.0
        for b in sorted(self._weight):
            if b_left < cutoff:
                break
            w = self._weight[b]
            rep = self._mass[b] / w
            if rep > prev:
                t += (rep - prev) * _effective_spt(speed, b_left, capacity)
                prev = rep
            b_left -= w
        return t


def _effective_spt(speed: ThroughputModel, batch: float, capacity: int | None) -> float:
    if capacity is not None and batch > capacity:
        return speed.seconds_per_token(capacity) * batch / capacity
    lo = max(int(batch), 1)
    if batch <= lo:
        return speed.seconds_per_token(lo)
    frac = batch - lo
    return (1 - frac) * speed.seconds_per_token(lo) + frac * speed.seconds_per_token(lo + 1)


def drain_seconds(
    remaining: Sequence[float], speed: ThroughputModel, *, capacity: int | None = None
) -> float:
    """Predicted time until every one of these samples (remaining tokens each) finishes.

    Sorted r_(1) <= ... <= r_(n): while the j-th shortest is being finished, n - j + 1 samples
    run, so T = sum_j (r_(j) - r_(j-1)) * spt(n - j + 1).
    """
    profile = RemainingProfile()
    for r in remaining:
        profile.add_values((r,))
    return profile.drain_seconds(speed, capacity=capacity)
