"""Online learning of a cost table: real engine steps correct the calibrated grid cell by cell.

Place in the flow: after calibration, a generation worker feeds every real engine step to
`cost_model.CostModel.observe_verify`, which compares it with the calibrated surface and hands
the log ratio to the model's `OnlineEvidence`. That keeps, per grid cell, a decaying weighted
mean of these ratios and turns them into the corrected grid the selector queries (made
monotone again with `cost_surface.make_monotone`). The evidence is saved with the table, and
enough of it marks a planned cell as known (`KNOWN_EVIDENCE`), so a later calibration need not
measure it. Pure standard library.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from .cost_surface import make_monotone

ONLINE_HALF_LIFE = 64.0
"""Online evidence of a grid cell halves every this many observations (their weights) of that
cell: the table follows a drifting machine (other tenants, longer contexts) within a few
hundred steps but is not thrown around by one stalled step."""
MEASURED_PRIOR = 4.0
"""Observations' worth of trust in a measured cell: real steps need a few of these before they
move it far (a probe step is a clean measurement; a real one may include a prefill)."""
FITTED_PRIOR = 0.25
"""The same for a fitted cell: a guess, so the first real steps there take over at once."""
ONLINE_CLIP = math.log(2.0)
"""One observation's log ratio to the cell's current estimate is clipped to +-max(this,
`ONLINE_CLIP_DEVIATIONS` x the cell's mean absolute deviation): a lone step that also
prefilled new prompts (several times a decode step) pulls a cell by at most 2x, while a
consistent error (observations far off, all alike: a bad fill) is not clipped for long."""
ONLINE_CLIP_DEVIATIONS = 2.0
KNOWN_EVIDENCE = 16.0
"""Online evidence at which an unmeasured planned cell no longer needs measuring."""
ONLINE_SPREAD = 0.3
"""Width of the kernel by which a cell's correction informs its neighbours (see
`OnlineEvidence._spread`), in grid coordinates (log B / log max B, (T - 1) / (max T - 1))."""
REFIT_EVERY = 8
"""Observations between rebuilds of the queried grid (a rebuild is ~0.1 ms; the selector's
per-(B, k) cache is cleared with it)."""


def _weights(xs: Sequence[float], x: float) -> list[tuple[int, float]]:
    """Linear-interpolation weights of x over the ascending grid xs (clamped at the ends)."""
    if len(xs) == 1 or x <= xs[0]:
        return [(0, 1.0)]
    if x >= xs[-1]:
        return [(len(xs) - 1, 1.0)]
    i = bisect.bisect_right(xs, x)
    f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return [(i - 1, 1.0 - f), (i, f)]


class OnlineEvidence:
    """Per grid cell, what real engine steps said about the calibrated step cost there.

    An observation (B, T, seconds) is compared with the calibrated surface (measured + fitted,
    without online corrections) at (B, T); its log ratio is credited to the surrounding grid
    cells with their bilinear weights. Each cell keeps an exponentially weighted mean of these
    log ratios (half-life `ONLINE_HALF_LIFE` observations; each clipped, see `ONLINE_CLIP`),
    shrunk by a prior (`MEASURED_PRIOR` / `FITTED_PRIOR` observations' worth) towards what its
    neighbours learned (`_spread`), and the queried grid is the calibrated one times
    exp(correction), made monotone again (weighted by evidence: a well-observed cell is not
    pulled up by a guessed neighbour).
    """

    def __init__(
        self, bs: Sequence[float], ts: Sequence[float], measured: frozenset[tuple[int, int]]
    ) -> None:
        self._bs = bs
        self._ts = ts
        self._measured = measured
        self._evidence: dict[tuple[int, int], list[float]] = {}
        """Grid cell (i, j) -> [weight, weighted sum of log ratios, weighted sum of absolute
        deviations] of online observations."""
        self._prior_mean: dict[tuple[int, int], float] = {}

    def weight_around(self, batch: float, tokens_per_seq: float) -> float:
        """Online observations' weight credited to the grid cells around (B, T) (bilinear)."""
        total = 0.0
        for (i, j), w in self._cells(batch, tokens_per_seq):
            total += w * self._evidence.get((i, j), [0.0])[0]
        return total

    def _cells(self, batch: float, tokens_per_seq: float) -> list[tuple[tuple[int, int], float]]:
        return [
            ((i, j), wb * wt)
            for i, wb in _weights(self._bs, batch)
            for j, wt in _weights(self._ts, tokens_per_seq)
            if wb * wt > 0.0
        ]

    def _prior(self, i: int, j: int) -> float:
        return MEASURED_PRIOR if self._is_measured(i, j) else FITTED_PRIOR

    def absorb(
        self,
        batch: float,
        tokens_per_seq: float,
        weight: float,
        total: float,
        deviation: float = 0.0,
        *_: float,
    ) -> None:
        """Add stored evidence (weight, weighted sums of log ratios and of absolute deviations)
        without decay (a reload)."""
        if weight <= 0.0 or not math.isfinite(total) or not math.isfinite(deviation):
            return
        for cell, w in self._cells(batch, tokens_per_seq):
            acc = self._evidence.setdefault(cell, [0.0, 0.0, 0.0])
            acc[0] += w * weight
            acc[1] += w * total
            acc[2] += w * deviation

    def observe(self, batch: float, tokens_per_seq: float, ratio: float) -> None:
        """Credit one observation's log ratio (real step / calibrated surface) at (B, T) to the
        grid cells around it, each with its bilinear weight, clipped and decayed per cell."""
        for (i, j), w in self._cells(batch, tokens_per_seq):
            acc = self._evidence.setdefault((i, j), [0.0, 0.0, 0.0])
            current = self._correction(i, j)
            spread = acc[2] / acc[0] if acc[0] > 0.0 else 0.0
            clip = max(ONLINE_CLIP, ONLINE_CLIP_DEVIATIONS * spread)
            clipped = current + min(max(ratio - current, -clip), clip)
            decay = 0.5 ** (w / ONLINE_HALF_LIFE)
            acc[0] = acc[0] * decay + w
            acc[1] = acc[1] * decay + w * clipped
            acc[2] = acc[2] * decay + w * abs(ratio - current)

    def corrected(self, base: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        """The calibrated grid ``base`` times each cell's exp(correction), made monotone again
        (``base`` itself while there is no evidence)."""
        self._prior_mean = self._spread()
        if not self._evidence:
            return base
        grid = [
            [v * math.exp(self._correction(i, j)) for j, v in enumerate(row)]
            for i, row in enumerate(base)
        ]
        weights = [
            [self._prior(i, j) + self._evidence.get((i, j), [0.0])[0] for j in range(len(row))]
            for i, row in enumerate(base)
        ]
        return tuple(tuple(row) for row in make_monotone(grid, weights))

    def _correction(self, i: int, j: int) -> float:
        """A cell's log correction: its own observations' mean, shrunk towards what its
        neighbours learned (`_spread`) by its prior's weight."""
        mean = self._prior_mean.get((i, j), 0.0)
        acc = self._evidence.get((i, j))
        if acc is None:
            return mean
        prior = self._prior(i, j)
        return (acc[1] + prior * mean) / (acc[0] + prior)

    def _spread(self) -> dict[tuple[int, int], float]:
        """What each cell's neighbours say before its own observations: the evidence-weighted
        mean of the observed cells' corrections, by a Gaussian kernel of width `ONLINE_SPREAD`
        in (log B, T) scaled to the grid, shrunk towards 0 by one observation's weight (far
        from any observation it stays 0). A fitted cell hears every observed cell (a fill
        that is off is off around it too); a measured cell only measured ones (that probes
        and real steps differ is not a fill error)."""
        observed = []
        for (i, j), acc in self._evidence.items():
            if acc[0] > 0.0:
                own = acc[1] / (acc[0] + self._prior(i, j))
                observed.append((self._coords(i, j), acc[0], own, self._is_measured(i, j)))
        out: dict[tuple[int, int], float] = {}
        if not observed:
            return out
        for i in range(len(self._bs)):
            for j in range(len(self._ts)):
                u, v = self._coords(i, j)
                measured = self._is_measured(i, j)
                num = den = 0.0
                for (ou, ov), weight, own, from_measured in observed:
                    if measured and not from_measured:
                        continue
                    d2 = (u - ou) ** 2 + (v - ov) ** 2
                    if d2 == 0.0:
                        continue  # its own observations count as such, not as a prior
                    w = weight * math.exp(-d2 / (2.0 * ONLINE_SPREAD**2))
                    num += w * own
                    den += w
                if num:
                    out[(i, j)] = num / (den + 1.0)
        return out

    def _coords(self, i: int, j: int) -> tuple[float, float]:
        b_max, t_max = self._bs[-1], self._ts[-1]
        u = math.log(self._bs[i]) / math.log(b_max) if b_max > 1 else 0.0
        v = (self._ts[j] - 1.0) / (t_max - 1.0) if t_max > 1 else 0.0
        return u, v

    def _is_measured(self, i: int, j: int) -> bool:
        return (int(self._bs[i]), int(self._ts[j])) in self._measured

    def stored(self) -> list[tuple[int, int, float, float, float]]:
        """Each observed grid cell as (B, T, weight, weighted sums of log ratios and of
        absolute deviations): what `absorb` reads back."""
        return sorted(
            (int(self._bs[i]), int(self._ts[j]), acc[0], acc[1], acc[2])
            for (i, j), acc in self._evidence.items()
            if acc[0] > 0.0
        )
