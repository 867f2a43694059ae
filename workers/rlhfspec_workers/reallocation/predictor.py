"""Remaining-length prediction for running samples: E[L - g | L > g].

Where it sits: the coordinator keeps one `LengthPredictor` per job. It is seeded with the
response lengths of earlier iterations, observes every sample that finishes in the current
iteration (with its prompt group), and the planner asks it how many tokens each running sample
still needs, given the g tokens it has generated.

Why a conditional expectation over an empirical distribution: response lengths in RLHF are
long-tailed (a few long samples keep the stage running while most of the batch is done), so
the mean residual life grows with g: a sample that is already long is likely to be much longer,
which is exactly the signal that marks the long tail. Samples of the same prompt group have
correlated lengths (Seer's context-aware scheduling relies on this), so finished siblings
refine the estimate. Both are shrunk toward a prior: with no data past g, a memoryless guess of
the mean length (or `prior_mean` before any data) is the sane fallback.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence

from .model import RunningSample

QUANTILE_EDGES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.97, 0.99, 0.997, 1.0)
"""A sample's remaining length is summarised by one value per band of its distribution. The
bands narrow toward the top because a worker's finish is set by its longest samples: with 256
samples running, the last one is near the 99.8% quantile, which equal-width bands would miss."""


class LengthPredictor:
    """Empirical conditional-expectation predictor of remaining tokens, group-aware."""

    def __init__(
        self,
        lengths: Iterable[int] = (),
        *,
        prior_mean: float = 512.0,
        prior_weight: float = 4.0,
        group_weight: float = 2.0,
        max_tokens: int | None = None,
        quantile_edges: Sequence[float] = QUANTILE_EDGES,
        min_support: int = 8,
    ) -> None:
        if prior_mean <= 0 or prior_weight <= 0 or group_weight <= 0:
            raise ValueError("prior_mean, prior_weight and group_weight must be > 0")
        edges = [float(e) for e in quantile_edges]
        if len(edges) < 2 or edges[0] != 0.0 or edges[-1] != 1.0 or edges != sorted(set(edges)):
            raise ValueError(f"quantile_edges must rise strictly from 0 to 1: {quantile_edges}")
        if min_support < 1:
            raise ValueError("min_support must be >= 1")
        self.levels = tuple((a + b) / 2 for a, b in itertools.pairwise(edges))
        self.weights = tuple(b - a for a, b in itertools.pairwise(edges))
        self.min_support = min_support
        self._cache: dict[tuple[int, str | None, int | None], tuple[float, ...]] = {}
        self.prior_mean = prior_mean
        self.prior_weight = prior_weight
        self.group_weight = group_weight
        self.max_tokens = max_tokens
        self._sorted: list[int] = sorted(int(x) for x in lengths)
        self._suffix: list[float] = []
        self._dirty = True
        self._groups: dict[str, list[int]] = {}

    @property
    def observations(self) -> int:
        return len(self._sorted)

    def observe(self, length: int, group_id: str | None = None) -> None:
        """A finished sample's response length (tokens)."""
        bisect.insort(self._sorted, int(length))
        self._dirty = True
        self._cache.clear()
        if group_id is not None:
            self._groups.setdefault(group_id, []).append(int(length))

    def _suffix_sums(self) -> list[float]:
        if self._dirty:
            acc = 0.0
            suffix = [0.0] * (len(self._sorted) + 1)
            for i in range(len(self._sorted) - 1, -1, -1):
                acc += self._sorted[i]
                suffix[i] = acc
            self._suffix = suffix
            self._dirty = False
        return self._suffix

    def _prior_residual(self) -> float:
        if self._sorted:
            return self._suffix_sums()[0] / len(self._sorted)
        return self.prior_mean

    def global_remaining(self, generated: int) -> float:
        """E[L - g | L > g] over all observed lengths, shrunk toward the prior."""
        i = bisect.bisect_right(self._sorted, generated)
        count = len(self._sorted) - i
        excess = self._suffix_sums()[i] - generated * count if count else 0.0
        prior = self._prior_residual()
        return (excess + self.prior_weight * prior) / (count + self.prior_weight)

    def predict_remaining(
        self, generated: int, *, group_id: str | None = None, max_tokens: int | None = None
    ) -> float:
        """Expected tokens still to come for a sample that has generated `generated`."""
        estimate = self.global_remaining(generated)
        siblings = self._groups.get(group_id, []) if group_id is not None else []
        longer = [x - generated for x in siblings if x > generated]
        if longer:
            estimate = (sum(longer) + self.group_weight * estimate) / (
                len(longer) + self.group_weight
            )
        cap = max_tokens if max_tokens is not None else self.max_tokens
        if cap is not None:
            estimate = min(estimate, float(max(cap - generated, 0)))
        return max(estimate, 1.0) if cap is None or cap > generated else 0.0

    def remaining_quantiles(
        self, generated: int, *, group_id: str | None = None, max_tokens: int | None = None
    ) -> tuple[float, ...]:
        """Remaining tokens at the middle of each quantile band (`levels`; band widths are
        `weights`).

        With at least `min_support` earlier lengths past g: the empirical conditional
        quantiles, scaled so their mean is `predict_remaining`'s (which carries the group and
        prior shrinkage). With less: an exponential with that mean (memoryless, the prior's
        shape). Why quantiles, not just the mean: a worker's finish is set by its longest
        samples, and under a heavy tail the mean says little about them.
        """
        key = (generated, group_id, max_tokens)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        mean = self.predict_remaining(generated, group_id=group_id, max_tokens=max_tokens)
        levels = self.levels
        i = bisect.bisect_right(self._sorted, generated)
        count = len(self._sorted) - i
        if count >= self.min_support:
            qs = [
                float(self._sorted[i + min(int(u * count), count - 1)] - generated) for u in levels
            ]
            emp_mean = (self._suffix_sums()[i] - generated * count) / count
            scale = mean / emp_mean if emp_mean > 0 else 1.0
            qs = [q * scale for q in qs]
        else:
            qs = [-mean * math.log(1.0 - u) for u in levels]
        cap = max_tokens if max_tokens is not None else self.max_tokens
        if cap is not None:
            room = float(max(cap - generated, 0))
            qs = [min(q, room) for q in qs]
        out = tuple(max(q, 0.0) for q in qs)
        if len(self._cache) < 100_000:
            self._cache[key] = out
        return out

    def predict(self, sample: RunningSample) -> float:
        """The sample's own prediction when its report has one, else this model's mean."""
        if sample.predicted_remaining is not None:
            return max(sample.predicted_remaining, 0.0)
        return self.predict_remaining(
            sample.generated_tokens, group_id=sample.group_id, max_tokens=sample.max_tokens
        )

    def points(self, sample: RunningSample) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """What the planner drains, as (values, weights): the report's own prediction as one
        point, else the quantile bands."""
        if sample.predicted_remaining is not None:
            return (max(sample.predicted_remaining, 0.0),), (1.0,)
        values = self.remaining_quantiles(
            sample.generated_tokens, group_id=sample.group_id, max_tokens=sample.max_tokens
        )
        return values, self.weights
