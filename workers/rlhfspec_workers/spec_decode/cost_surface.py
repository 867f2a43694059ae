"""The shape of a step-cost table: monotone fits, interpolation, and the fill of unmeasured cells.

Place in the flow: `cost_model.CostModel` reduces calibration's measurements to one value per
(B, T) cell (`shrink_to_surface`: the median, shrunk towards a fitted `Surface` as far as the
repeats say it is noise), fills the planned cells calibration did not reach with
`fill_unmeasured` (a fitted `Surface`, non-negative a + b*B + c*T + d*B*T plus a roofline knee,
corrected by the nearby measurements), makes the grid monotone (`make_monotone`) and answers the
selector's queries by interpolating it (`grid_value`); drafter per-token costs are a
`MonotoneCurve` over batch size. Online learning (`cost_online`) re-applies `make_monotone` to
the corrected grid.

Why interpolate measurements instead of fitting a formula: verification cost is flat while the
step is memory-bound and grows with B x T once compute-bound, and where the knee sits depends on
the model, the kernels and the card (measured CPU figures: docs/cpu-notes.md §3-4). A
monotone piecewise-linear surface over measured points follows any knee; a linear
extrapolation past the grid keeps the compute-bound slope. Where the measurements are noisier
than the surface is wrong (a shared CPU), the surface's shape is the better guess, and the
measured cells lean on it (`shrink_to_surface`). Pure standard library: this runs inside the
coordinator and in CPU-only tests.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


def isotonic(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Pool-adjacent-violators: the closest non-decreasing sequence (weighted least squares).

    Why not a running max: one noisy high sample would lift every later point; pooling
    averages it with its neighbours instead. It is also order-preserving (larger inputs give
    larger outputs), which keeps rows monotone when we then fix the columns. Weights say how
    much each value is trusted: a measured cell barely moves for a fitted neighbour.
    """
    blocks: list[list[float]] = []  # [weighted sum, weight, count]
    for i, v in enumerate(values):
        w = 1.0 if weights is None else weights[i]
        blocks.append([v * w, w, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, ww, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += ww
            blocks[-1][2] += c
    out: list[float] = []
    for s, ww, c in blocks:
        out.extend([s / ww] * int(c))
    return out


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), xs ascending, ys non-decreasing.

    Inside: linear. Below: clamp to the first point (the cheapest measured step is a floor).
    Above: linear from the last segment, so a compute-bound slope continues past the grid.
    """
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + max(slope, 0.0) * (x - xs[-1])
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (x - x0) / (x1 - x0) * (y1 - y0)


@dataclass(frozen=True)
class MonotoneCurve:
    """A monotone 1-D cost curve over batch size (used for drafter per-token costs)."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    @classmethod
    def fit(cls, points: Iterable[tuple[int, float]]) -> MonotoneCurve:
        by_x: dict[int, list[float]] = {}
        for x, y in points:
            by_x.setdefault(x, []).append(y)
        xs = sorted(by_x)
        ys = isotonic([statistics.median(by_x[x]) for x in xs])
        return cls(tuple(float(x) for x in xs), tuple(ys))

    def __call__(self, x: float) -> float:
        return interpolate(self.xs, self.ys, x) if self.xs else 0.0


def make_monotone(
    grid: list[list[float]], weights: list[list[float]] | None = None
) -> list[list[float]]:
    """Each row non-decreasing in T, then each column non-decreasing in B (weighted PAV;
    with equal weights PAV is order-preserving, so the rows stay monotone). With unequal
    weights a running max along rows and then columns guarantees it (a no-op otherwise)."""
    w = weights or [[1.0] * len(row) for row in grid]
    out = [isotonic(row, w[i]) for i, row in enumerate(grid)]
    for j in range(len(out[0]) if out else 0):
        column = isotonic([row[j] for row in out], [row[j] for row in w])
        for i, v in enumerate(column):
            out[i][j] = v
    for row in out:
        for j in range(1, len(row)):
            row[j] = max(row[j], row[j - 1])
    for i in range(1, len(out)):
        out[i] = [max(v, above) for v, above in zip(out[i], out[i - 1], strict=True)]
    return out


def grid_value(
    bs: Sequence[float],
    ts: Sequence[float],
    grid: Sequence[Sequence[float]],
    b: float,
    t: float,
) -> float:
    """The surface over the grid (rows per B in ``bs``, columns per T in ``ts``) at (b, t):
    `interpolate` along T within each row, then along B."""
    rows = [interpolate(ts, row, t) for row in grid]
    # Rows extrapolated in T with different slopes could cross; a running max over B keeps
    # the surface monotone there too (inside the grid it is already monotone).
    for i in range(1, len(rows)):
        rows[i] = max(rows[i], rows[i - 1])
    return interpolate(bs, rows, b)


# -- the fill model: what calibration did not measure ------------------------------------------

_SUBSETS: tuple[tuple[int, ...], ...] = (
    (0, 1, 2, 3), (0, 1, 3), (0, 2, 3), (0, 3), (0, 1, 2), (1, 3), (2, 3), (0, 1), (0, 2),
    (1, 2, 3), (3,), (1, 2), (0,), (1,), (2,),
)  # fmt: skip
"""Subsets of the terms 1, B, T, B*T tried (in order of preference on a tie)."""
_HINGE_SUBSETS: tuple[tuple[int, ...], ...] = ((0, 4), (0, 1, 4), (0, 2, 4), (0, 1, 2, 4))
"""The same with the hinge max(0, B*T - knee) (index 4), for each candidate knee."""


FIT_TIE_RMS = 0.02
"""Fits whose RMS relative error is within this of the best one's are equally good (timing
noise on a busy machine is larger); among them the costliest over the cells to fill wins."""


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when (numerically) singular."""
    n = len(rhs)
    a = [[*row, rhs[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-9:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= f * a[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


@dataclass(frozen=True)
class Surface:
    """A smooth, monotone stand-in for the step cost:

        t(B, T) = a + b*B + c*T + d*B*T + e*max(0, B*T - knee),   every coefficient >= 0

    a fixed step cost, a per-sequence and a per-position cost, a per-token cost, and a
    roofline knee: flat (memory-bound) until the step processes `knee` tokens, then growing
    with them (compute-bound). Non-decreasing in B and in T. As in a roofline (overhead +
    max(memory, per_token * n)), e * knee <= a: past the knee a token never costs more than
    the whole step's average at the knee (without it a knee just below the largest measured
    token count could fit any steep extrapolation).

    Fit: non-negative least squares on *relative* error (step costs span orders of magnitude;
    a 10% miss matters as much at B = 1 as at B = 256), over subsets of the terms and, for the
    hinge, knees at the measured token counts and on a half-octave grid between them; the
    best fit wins. When the points cannot tell fits apart (within `FIT_TIE_RMS`, e.g. as many
    points as terms), the one predicting the highest cost over the cells to fill (in log, so
    each cell counts alike) wins: a too-high cost only makes the selector draft a little less,
    a too-low one at a large batch can make it slower than plain decoding. Cells calibration
    did not reach are filled from it; measured cells lean on it only as far as their repeats
    say they are noise (`shrink_to_surface`).
    """

    a: float
    b: float
    c: float
    d: float
    e: float = 0.0
    knee: float = 0.0

    def __call__(self, batch: float, tokens_per_seq: float) -> float:
        n = batch * tokens_per_seq
        linear = self.a + self.b * batch + self.c * tokens_per_seq + self.d * n
        return linear + self.e * max(0.0, n - self.knee)

    @classmethod
    def fit(
        cls,
        cells: Mapping[tuple[int, int], float],
        targets: Sequence[tuple[int, int]] = (),
    ) -> Surface:
        """Fit through the measured ``cells`` ((B, T) -> seconds); ``targets``: the cells to
        be filled (for the tie-break)."""
        points = [(b, t, s) for (b, t), s in sorted(cells.items()) if s > 0.0]
        if not points:
            raise ValueError("a surface needs at least one positive cost")
        if len(points) == 1:
            # One point says nothing about the shape: half fixed, half per token (a middle
            # ground between memory-bound, flat, and compute-bound, linear in B x T).
            b0, t0, s0 = points[0]
            return cls(s0 / 2.0, 0.0, 0.0, s0 / (2.0 * b0 * t0))
        candidates = [(s, 0.0) for s in _SUBSETS]
        # Knees at the measured token counts and on a half-octave grid between them (a knee
        # between two measured cells is seen only through the cells around it).
        counts = sorted({float(b * t) for b, t, _ in points})
        knees = {c for c in counts[:-1]}
        x = counts[0] * math.sqrt(2.0)
        while x < counts[-1]:
            knees.add(round(x, 6))
            x *= math.sqrt(2.0)
        candidates += [(s, k) for k in sorted(knees) for s in _HINGE_SUBSETS]
        fits: list[tuple[float, Surface]] = []
        for subset, knee in candidates:
            coef = cls._least_squares(points, subset, knee)
            if coef is None:
                continue
            full = [0.0] * 5
            for j, v in zip(subset, coef, strict=True):
                full[j] = v
            if full[4] * knee > full[0] * (1.0 + 1e-9) + 1e-15:
                continue  # past its knee a step would cost more per token than at it
            surface = cls(full[0], full[1], full[2], full[3], full[4], knee)
            residual = sum((surface(b, t) / s - 1.0) ** 2 for b, t, s in points)
            fits.append((residual, surface))
        if not fits:  # cannot happen (a constant always fits), but never fail a calibration
            return cls(statistics.fmean(s for _, _, s in points), 0.0, 0.0, 0.0)
        n = len(points)
        best = math.sqrt(min(r for r, _ in fits) / n)
        tied = [f for r, f in fits if math.sqrt(r / n) <= best + FIT_TIE_RMS]
        if len(tied) == 1 or not targets:
            return tied[0]

        def level(f: Surface) -> float:
            return round(sum(math.log(max(f(b, t), 1e-300)) for b, t in targets), 9)

        # max() keeps the first of equals: the order of preference above.
        return max(tied, key=level)

    @staticmethod
    def _term(j: int, b: float, t: float, knee: float) -> float:
        return (1.0, b, t, b * t, max(0.0, b * t - knee))[j]

    @classmethod
    def _least_squares(
        cls, points: Sequence[tuple[int, int, float]], subset: tuple[int, ...], knee: float
    ) -> list[float] | None:
        """Coefficients of `subset` minimising sum((f / s - 1)^2), or None when they are not
        determined by the points or one is negative."""
        rows = [[cls._term(j, b, t, knee) / s for j in subset] for b, t, s in points]
        m = len(subset)
        norms = [math.sqrt(sum(r[i] ** 2 for r in rows)) for i in range(m)]
        if min(norms) <= 0.0:
            return None
        z = [[r[i] / norms[i] for i in range(m)] for r in rows]
        gram = [[sum(r[i] * r[j] for r in z) for j in range(m)] for i in range(m)]
        rhs = [sum(r[i] for r in z) for i in range(m)]
        w = _solve(gram, rhs)
        if w is None:
            return None
        coef = [w[i] / norms[i] for i in range(m)]
        if any(c < 0.0 for c in coef):
            return None
        return coef


SHRINK_MIN_CELLS = 8
"""Measured cells below which `shrink_to_surface` leaves them as they are: a surface of up to
six terms fitted through fewer cells would mostly follow their noise."""


def shrink_to_surface(
    samples: Mapping[tuple[int, int], Sequence[float]],
) -> dict[tuple[int, int], float]:
    """Each measured cell's value: its median, shrunk towards the fitted `Surface` by as much
    as the repeats say it is noise (empirical Bayes, in log cost).

    A cell's log misfit r = log(median / surface) is part real (a knee the surface cannot
    follow) and part noise (sd ``sigma / sqrt(n)`` for n repeats; ``sigma`` pooled over the
    cells measured more than once, robustly: a stalled probe must not read as noise
    everywhere). With the real part's variance ``tau2 = mean(r^2) - mean(sigma^2 / n)``, the
    cell keeps the fraction ``tau2 / (tau2 + sigma^2 / n)`` of its misfit. Clean measurements
    (a GPU, sigma ~ 1%) keep their values; a shared CPU's (sigma 5-20% per probe) take the
    surface's shape. Why: the selector compares k values by the ratio of cells in one row, and
    on a 2-core Xeon VM nine calibrations of the same model were off the row shapes of a
    careful reference (interleaved probes, four passes) by 0.052-0.10 rms in log cost, priced
    T = 5 against T = 3 up to 29% off, and put a T = 2 cell above T = 3; the surface fitted
    through the same cells was off by 0.042-0.056 (the reference's own repeatability: 0.047-
    0.065) and within 6% on every T = 5 / T = 3 ratio (docs/speculation.md, fourth session
    of 2026-12-06). Without repeats nothing tells noise from shape, and the cells stay as
    measured."""
    medians = {c: statistics.median(v) for c, v in samples.items() if v}
    if len(medians) < SHRINK_MIN_CELLS or any(m <= 0.0 for m in medians.values()):
        return medians
    deviations = [
        abs(math.log(s / medians[c]))
        for c, v in samples.items()
        if len(v) > 1
        for s in v
        if s > 0.0
    ]
    if not deviations:
        return medians
    # Median absolute deviation to an sd (1.4826), and a median of two lies halfway between
    # them (sqrt(2): each sample's deviation is half their difference).
    sigma = 1.4826 * math.sqrt(2.0) * statistics.median(deviations)
    if sigma == 0.0:
        return medians  # repeats agree: every misfit is shape, kept whole (no fit needed)
    surface = Surface.fit(medians)
    misfit = {c: math.log(m / surface(*c)) for c, m in medians.items()}
    noise = {c: sigma**2 / len(samples[c]) for c in medians}
    real = max(
        0.0, statistics.fmean(r * r for r in misfit.values()) - statistics.fmean(noise.values())
    )
    out: dict[tuple[int, int], float] = {}
    for c in medians:
        keep = real / (real + noise[c]) if real + noise[c] > 0.0 else 1.0
        out[c] = surface(*c) * math.exp(keep * misfit[c])
    return out


def fill_unmeasured(
    cells: Mapping[tuple[int, int], float], wanted: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], float]:
    """Values for unmeasured cells: the fitted `Surface` times the measured cells' own misfit
    (log ratio), interpolated by inverse squared distance in (log B, T) normalised to the grid.
    The fill then passes through every measured cell's neighbourhood smoothly, and far from any
    measurement follows the surface's shape scaled by the average misfit."""
    todo = [c for c in wanted if c not in cells]
    if not todo:
        return {}
    if not any(s > 0.0 for s in cells.values()):
        return dict.fromkeys(todo, 0.0)
    surface = Surface.fit(cells, todo)
    b_max = max(max(b for b, _ in cells), max(b for b, _ in todo))
    t_max = max(max(t for _, t in cells), max(t for _, t in todo))

    def at(b: int, t: int) -> tuple[float, float]:
        u = math.log(b) / math.log(b_max) if b_max > 1 else 0.0
        v = (t - 1) / (t_max - 1) if t_max > 1 else 0.0
        return u, v

    misfit = [(at(b, t), math.log(s / surface(b, t))) for (b, t), s in cells.items() if s > 0]
    if not misfit:
        return dict.fromkeys(todo, 0.0)
    out: dict[tuple[int, int], float] = {}
    for b, t in todo:
        u, v = at(b, t)
        num = den = 0.0
        for (mu, mv), r in misfit:
            w = 1.0 / ((u - mu) ** 2 + (v - mv) ** 2 + 1e-12)
            num += w * r
            den += w
        out[(b, t)] = surface(b, t) * math.exp(num / den if den > 0 else 0.0)
    return out
