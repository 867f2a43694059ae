"""Cost model of one engine step: what a (drafter, k) choice costs at batch size B.

Place in the flow: a generation worker measures a small grid of step times once per
(model, hardware) at start-up (`calibration_plan` says which, `calibration_order` in which
order, within a time budget), fits a `CostModel`, caches it as JSON under a `CostTableKey`,
and hands it to the selector. The selector asks it, many times per decode step, for
`step_seconds(drafter, B, k)` = verification of k+1 tokens per sequence plus k draft forwards.
While the job runs, the worker feeds each real engine step back (`CostModel.observe_verify`),
so what calibration could not measure, or measured on short probe prompts, converges to what
real steps cost; the refined table goes back to the cache.

Partial tables: a budget may end calibration before every planned cell is measured. The
table then records its plan; the cells without measurements are filled by a fitted `Surface`
(non-negative a + b*B + c*T + d*B*T, corrected by the nearby measurements), so every (B, k)
the selector may ask for is covered, and a later worker measures only what is still missing.

Why interpolate measurements instead of fitting a formula: verification cost is flat while the
step is memory-bound and grows with B x T once compute-bound, and where the knee sits depends on
the model, the kernels and the card (field notes 6, 7). A monotone piecewise-linear surface over
measured points follows any knee; a linear extrapolation past the grid keeps the compute-bound
slope. Pure standard library: this runs inside the coordinator and in CPU-only tests.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

OFF = "off"
"""Drafter name meaning "no speculation" (k = 0)."""

_SCHEMA_V1 = "rlhfspec.spec_decode.cost_model/v1"
_SCHEMA = "rlhfspec.spec_decode.cost_model/v2"


@dataclass(frozen=True)
class CostSample:
    """One measured engine step: B sequences, T = k + 1 tokens verified per sequence."""

    batch_size: int
    tokens_per_seq: int
    seconds: float

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.tokens_per_seq < 1:
            raise ValueError(f"batch_size and tokens_per_seq must be >= 1: {self}")
        if not (self.seconds >= 0.0 and math.isfinite(self.seconds)):
            raise ValueError(f"seconds must be finite and >= 0: {self}")


@dataclass(frozen=True)
class DrafterCost:
    """What proposing k tokens costs one drafter: a fixed per-step overhead when drafting at
    all (k > 0), plus k draft forwards whose cost depends on B.

    `per_token` holds measured (batch_size, seconds per draft forward) points; empty means a
    model-free drafter (n-gram, suffix tree) whose per-token cost is negligible.
    """

    name: str
    overhead_seconds: float = 0.0
    per_token: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.name == OFF:
            raise ValueError(f"{OFF!r} is reserved for 'no speculation'")
        if self.overhead_seconds < 0.0 or any(b < 1 or s < 0.0 for b, s in self.per_token):
            raise ValueError(f"negative cost or batch < 1 in {self}")


@dataclass(frozen=True)
class CostTableKey:
    """Identity of a calibration: it is valid for one target model on one hardware type."""

    model_id: str
    hardware_id: str

    def slug(self) -> str:
        """A file-name / Redis-key safe id, stable across runs."""
        raw = f"{self.model_id}@{self.hardware_id}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_")


def _isotonic(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
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


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
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
class _Curve:
    """A monotone 1-D cost curve over batch size (used for drafter per-token costs)."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    @classmethod
    def fit(cls, points: Iterable[tuple[int, float]]) -> _Curve:
        by_x: dict[int, list[float]] = {}
        for x, y in points:
            by_x.setdefault(x, []).append(y)
        xs = sorted(by_x)
        ys = _isotonic([statistics.median(by_x[x]) for x in xs])
        return cls(tuple(float(x) for x in xs), tuple(ys))

    def __call__(self, x: float) -> float:
        return _interp(self.xs, self.ys, x) if self.xs else 0.0


@dataclass(frozen=True)
class _DrafterModel:
    cost: DrafterCost
    per_token: _Curve
    planned: bool
    """Calibration meant to measure it: with no point measured it is not free (see
    `CostModel.draft_seconds`)."""


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
    a too-low one at a large batch can make it slower than plain decoding. Only cells
    calibration did not reach are filled from it; measured cells keep their own values.
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


def _fill(
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


def _monotone(
    grid: list[list[float]], weights: list[list[float]] | None = None
) -> list[list[float]]:
    """Each row non-decreasing in T, then each column non-decreasing in B (weighted PAV;
    with equal weights PAV is order-preserving, so the rows stay monotone). With unequal
    weights a running max along rows and then columns guarantees it (a no-op otherwise)."""
    w = weights or [[1.0] * len(row) for row in grid]
    out = [_isotonic(row, w[i]) for i, row in enumerate(grid)]
    for j in range(len(out[0]) if out else 0):
        column = _isotonic([row[j] for row in out], [row[j] for row in w])
        for i, v in enumerate(column):
            out[i][j] = v
    for row in out:
        for j in range(1, len(row)):
            row[j] = max(row[j], row[j - 1])
    for i in range(1, len(out)):
        out[i] = [max(v, above) for v, above in zip(out[i], out[i - 1], strict=True)]
    return out


def _weights(xs: Sequence[float], x: float) -> list[tuple[int, float]]:
    """Linear-interpolation weights of x over the ascending grid xs (clamped at the ends)."""
    if len(xs) == 1 or x <= xs[0]:
        return [(0, 1.0)]
    if x >= xs[-1]:
        return [(len(xs) - 1, 1.0)]
    i = bisect.bisect_right(xs, x)
    f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return [(i - 1, 1.0 - f), (i, f)]


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
`CostModel._spread`), in grid coordinates (log B / log max B, (T - 1) / (max T - 1))."""
REFIT_EVERY = 8
"""Observations between rebuilds of the queried grid (a rebuild is ~0.1 ms; the selector's
per-(B, k) cache is cleared with it)."""
UNMEASURED_DRAFT_SHARE = 0.25
"""A drafter calibration meant to measure but never reached costs this share of a plain
decode step per draft token: pessimistic (never free, or it would always win), and the
drafter can still win where acceptance is high."""


class CostModel:
    """Monotone interpolated step-cost surface verify(B, T) plus per-drafter draft costs.

    Fit: samples are grouped per (B, T) and reduced to their median (robust to the 2-3x
    stalls a shared machine produces, field notes 6). The grid is the union of the measured
    cells and the *plan* (the cells calibration meant to measure; by default the measured
    ones); planned cells calibration did not reach are filled by `_fill` (a fitted `Surface`
    corrected by nearby measurements). Each B row is made non-decreasing in T and then each T
    column non-decreasing in B. Query: bilinear in (B, T), linear extrapolation past the grid.

    Why linear in B rather than log B: within one regime a step is close to affine in B
    (weights read once, then per-sequence KV reads and per-token compute: field notes 6 has
    t50 at 6.3 / 7.3 / 11.6 / 27.8 ms for B = 1 / 4 / 16 / 64, nearly a + b*B), so linear
    interpolation is exact inside a regime and errs only across a knee, where the chord of a
    convex curve overestimates (the safe side: a too-small k costs little). Log-B interpolation
    overestimates a compute-bound segment by up to 25% at 4x grid spacing.

    Online learning (`observe_verify`): real engine steps refine the table while a job runs.
    An observation (B, T, seconds) is compared with the calibrated surface (measured + fitted,
    without online corrections) at (B, T); its log ratio is credited to the surrounding grid
    cells with their bilinear weights. Each cell keeps an exponentially weighted mean of these
    log ratios (half-life `ONLINE_HALF_LIFE` observations; each clipped, see `ONLINE_CLIP`),
    shrunk by a prior (`MEASURED_PRIOR` / `FITTED_PRIOR` observations' worth) towards what its
    neighbours learned (`_spread`), and the queried grid is the calibrated one times
    exp(correction), made monotone again (weighted by evidence: a well-observed cell is not
    pulled up by a guessed neighbour). Everything else about an instance is fixed after
    construction; the online state is saved with it (`to_json`).
    """

    def __init__(
        self,
        key: CostTableKey,
        samples: Sequence[CostSample],
        drafters: Iterable[DrafterCost] = (),
        *,
        plan: Iterable[tuple[int, int]] | None = None,
        drafter_plan: Mapping[str, Iterable[int]] | None = None,
        online: Iterable[Sequence[float]] = (),
        bookkeeping: Iterable[tuple[int, float]] = (),
    ) -> None:
        if not samples:
            raise ValueError("a cost model needs at least one verification sample")
        self.key = key
        self.samples: tuple[CostSample, ...] = tuple(samples)
        measured = {(s.batch_size, s.tokens_per_seq) for s in self.samples}
        self.plan: tuple[tuple[int, int], ...] = tuple(
            sorted(measured if plan is None else {*measured, *plan})
        )
        """Every cell the table is meant to hold; those without samples are fitted."""
        if any(b < 1 or t < 1 for b, t in self.plan):
            raise ValueError(f"plan cells need B >= 1 and T >= 1: {self.plan}")
        self.drafter_plan: dict[str, tuple[int, ...]] = {
            name: tuple(sorted(set(bs))) for name, bs in (drafter_plan or {}).items()
        }
        """Batch sizes calibration meant to measure per drafter."""
        self.bookkeeping: tuple[tuple[int, float], ...] = tuple(sorted(bookkeeping))
        """(B, seconds): the engine's per-step cost of a drafting call that drafts nothing,
        already inside every verification sample; kept so that a later calibration can
        charge a drafter only what it adds to it."""
        self._drafters: dict[str, _DrafterModel] = {}
        for d in drafters:
            if d.name in self._drafters:
                raise ValueError(f"drafter {d.name!r} given twice")
            planned = d.name in self.drafter_plan
            self._drafters[d.name] = _DrafterModel(d, _Curve.fit(d.per_token), planned)
        self._bs, self._ts, self._base, self._measured = self._fit_grid(self.samples, self.plan)
        self._evidence: dict[tuple[int, int], list[float]] = {}
        """Grid cell (i, j) -> [weight, weighted sum of log ratios, weighted sum of absolute
        deviations] of online observations."""
        for cell in online:
            self._absorb(*(float(x) for x in cell))
        self._grid = self._base
        self._prior_mean: dict[tuple[int, int], float] = {}
        self._cache: dict[tuple[int, int], float] = {}
        self.observations = 0
        """Online observations taken by this instance (not persisted)."""
        self._unfolded = 0
        self.refresh()

    @classmethod
    def fit(
        cls,
        samples: Iterable[CostSample],
        drafters: Iterable[DrafterCost] = (),
        *,
        key: CostTableKey | None = None,
    ) -> CostModel:
        """Fit from measured samples (repeats welcome: each (B, T) cell takes their median)."""
        return cls(key or CostTableKey("unknown", "unknown"), list(samples), drafters)

    @staticmethod
    def _fit_grid(
        samples: Sequence[CostSample], plan: Sequence[tuple[int, int]]
    ) -> tuple[
        tuple[float, ...],
        tuple[float, ...],
        tuple[tuple[float, ...], ...],
        frozenset[tuple[int, int]],
    ]:
        by_cell: dict[tuple[int, int], list[float]] = {}
        for s in samples:
            by_cell.setdefault((s.batch_size, s.tokens_per_seq), []).append(s.seconds)
        cells = {c: statistics.median(v) for c, v in by_cell.items()}
        bs = sorted({b for b, _ in cells} | {b for b, _ in plan})
        ts = sorted({t for _, t in cells} | {t for _, t in plan})
        filled = _fill(cells, [(b, t) for b in bs for t in ts])
        grid = _monotone(
            [[cells.get((b, t), filled.get((b, t), 0.0)) for t in ts] for b in bs],
            [[1e6 if (b, t) in cells else 1.0 for t in ts] for b in bs],  # fits yield
        )
        return (
            tuple(float(b) for b in bs),
            tuple(float(t) for t in ts),
            tuple(tuple(row) for row in grid),
            frozenset(cells),
        )

    # -- queries ---------------------------------------------------------------------------

    @property
    def drafters(self) -> tuple[str, ...]:
        return tuple(self._drafters)

    def drafter_cost(self, name: str) -> DrafterCost:
        return self._drafters[name].cost

    @staticmethod
    def _surface_at(
        bs: Sequence[float],
        ts: Sequence[float],
        grid: Sequence[Sequence[float]],
        b: float,
        t: float,
    ) -> float:
        rows = [_interp(ts, row, t) for row in grid]
        # Rows extrapolated in T with different slopes could cross; a running max over B keeps
        # the surface monotone there too (inside the grid it is already monotone).
        for i in range(1, len(rows)):
            rows[i] = max(rows[i], rows[i - 1])
        return _interp(bs, rows, b)

    def verify_seconds(self, batch: int, k: int) -> float:
        """Step time verifying k draft tokens (T = k + 1 tokens) for each of `batch` sequences."""
        if batch < 1 or k < 0:
            raise ValueError(f"need batch >= 1 and k >= 0, got {batch}, {k}")
        cached = self._cache.get((batch, k))
        if cached is not None:
            return cached
        value = self._surface_at(self._bs, self._ts, self._grid, float(batch), float(k + 1))
        if len(self._cache) < 65536:  # the selector asks the same (B, k) every step
            self._cache[(batch, k)] = value
        return value

    def calibrated_seconds(self, batch: float, tokens_per_seq: float) -> float:
        """verify(B, T) as calibration left it (measured + fitted), without online evidence."""
        return self._surface_at(self._bs, self._ts, self._base, batch, tokens_per_seq)

    def draft_seconds(self, drafter: str, batch: int, k: int) -> float:
        """Cost of proposing k tokens per sequence: overhead + k draft forwards; 0 when k = 0.

        Per-token cost: interpolated over the measured batch sizes; with a single measured
        batch size B0 it scales like a plain decode step, per_token(B0) * verify(B, 0) /
        verify(B0, 0) (a draft forward grows with B as the target's does); a drafter
        calibration planned but never measured costs `UNMEASURED_DRAFT_SHARE` of verify(B, 0)
        per token. A drafter given without points (model-free) costs its overhead only."""
        if k == 0 or drafter == OFF:
            return 0.0
        if batch < 1 or k < 0:
            raise ValueError(f"need batch >= 1 and k >= 0, got {batch}, {k}")
        try:
            model = self._drafters[drafter]
        except KeyError:
            # Never guess "free" for an uncalibrated drafter: that would make it always win.
            raise KeyError(f"drafter {drafter!r} not calibrated in {self.key.slug()}") from None
        curve = model.per_token
        if len(curve.xs) > 1:
            per_token = curve(float(batch))
        elif len(curve.xs) == 1:
            b0 = max(1, int(curve.xs[0]))
            per_token = curve.ys[0] * self.verify_seconds(batch, 0) / self.verify_seconds(b0, 0)
        elif model.planned:
            per_token = UNMEASURED_DRAFT_SHARE * self.verify_seconds(batch, 0)
        else:
            per_token = 0.0
        return model.cost.overhead_seconds + k * per_token

    def step_seconds(self, drafter: str, batch: int, k: int) -> float:
        """One whole engine step: draft k tokens, then verify k + 1 per sequence."""
        k_eff = 0 if drafter == OFF else k
        return self.verify_seconds(batch, k_eff) + self.draft_seconds(drafter, batch, k_eff)

    # -- what calibration measured and what it fitted ----------------------------------------

    def measured(self, batch: int, tokens_per_seq: int) -> bool:
        return (batch, tokens_per_seq) in self._measured

    def evidence(self, batch: float, tokens_per_seq: float) -> float:
        """Online observations' weight credited to the grid cells around (B, T) (bilinear)."""
        total = 0.0
        for (i, j), w in self._cells(batch, tokens_per_seq):
            total += w * self._evidence.get((i, j), [0.0])[0]
        return total

    def missing(self) -> list[tuple[int, int]]:
        """Planned cells neither measured nor learned online (`KNOWN_EVIDENCE`): what a later
        calibration should measure."""
        return [
            (b, t)
            for b, t in self.plan
            if (b, t) not in self._measured and self.evidence(b, t) < KNOWN_EVIDENCE
        ]

    def missing_drafter_batches(self) -> dict[str, tuple[int, ...]]:
        """Per drafter, the planned batch sizes that have no measured point."""
        out: dict[str, tuple[int, ...]] = {}
        for name, batches in self.drafter_plan.items():
            model = self._drafters.get(name)
            have = {b for b, _ in model.cost.per_token} if model is not None else set()
            todo = tuple(b for b in batches if b not in have)
            if todo:
                out[name] = todo
        return out

    @property
    def partial(self) -> bool:
        """Whether calibration left planned cells or drafter batch sizes unmeasured (they are
        fitted, and refined online)."""
        unmeasured = any(c not in self._measured for c in self.plan)
        return unmeasured or bool(self.missing_drafter_batches())

    # -- online learning ---------------------------------------------------------------------

    def _cells(self, batch: float, tokens_per_seq: float) -> list[tuple[tuple[int, int], float]]:
        return [
            ((i, j), wb * wt)
            for i, wb in _weights(self._bs, batch)
            for j, wt in _weights(self._ts, tokens_per_seq)
            if wb * wt > 0.0
        ]

    def _prior(self, i: int, j: int) -> float:
        return MEASURED_PRIOR if self._is_measured(i, j) else FITTED_PRIOR

    def _absorb(
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

    def observe_verify(self, batch: int, tokens_per_seq: float, seconds: float) -> None:
        """Learn from one real engine step: `batch` rows verified `tokens_per_seq` tokens each
        on average (1 + draft tokens / rows; fractional when some rows got no draft) and the
        step, drafting excluded, took `seconds`. Cheap (a few dict updates); the queried grid
        is rebuilt every `REFIT_EVERY` observations (or on `refresh`)."""
        if batch < 1 or tokens_per_seq < 1.0 or not (seconds > 0.0 and math.isfinite(seconds)):
            return
        base = self.calibrated_seconds(float(batch), tokens_per_seq)
        if base <= 0.0:
            return
        ratio = math.log(seconds / base)
        for (i, j), w in self._cells(float(batch), tokens_per_seq):
            acc = self._evidence.setdefault((i, j), [0.0, 0.0, 0.0])
            current = self._correction(i, j)
            spread = acc[2] / acc[0] if acc[0] > 0.0 else 0.0
            clip = max(ONLINE_CLIP, ONLINE_CLIP_DEVIATIONS * spread)
            clipped = current + min(max(ratio - current, -clip), clip)
            decay = 0.5 ** (w / ONLINE_HALF_LIFE)
            acc[0] = acc[0] * decay + w
            acc[1] = acc[1] * decay + w * clipped
            acc[2] = acc[2] * decay + w * abs(ratio - current)
        self.observations += 1
        self._unfolded += 1
        if self._unfolded >= REFIT_EVERY:
            self.refresh()

    def refresh(self) -> None:
        """Rebuild the queried grid from the calibrated one and the online evidence."""
        self._unfolded = 0
        self._prior_mean = self._spread()
        if not self._evidence:
            self._grid = self._base
        else:
            grid = [
                [v * math.exp(self._correction(i, j)) for j, v in enumerate(row)]
                for i, row in enumerate(self._base)
            ]
            weights = [
                [self._prior(i, j) + self._evidence.get((i, j), [0.0])[0] for j in range(len(row))]
                for i, row in enumerate(self._base)
            ]
            self._grid = tuple(tuple(row) for row in _monotone(grid, weights))
        self._cache.clear()

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

    # -- combining -------------------------------------------------------------------------

    def extended(
        self,
        samples: Iterable[CostSample] = (),
        drafters: Iterable[DrafterCost] = (),
        *,
        plan: Iterable[tuple[int, int]] = (),
        drafter_plan: Mapping[str, Iterable[int]] | None = None,
        bookkeeping: Iterable[tuple[int, float]] = (),
    ) -> CostModel:
        """A new model with more measurements and a larger plan (a later calibration that
        continues a partial table); online evidence carries over. A drafter's new points join
        its old ones; its overhead is the new one's when given."""
        merged: dict[str, DrafterCost] = {d: m.cost for d, m in self._drafters.items()}
        for d in drafters:
            old = merged.get(d.name)
            points = (old.per_token if old is not None else ()) + d.per_token
            merged[d.name] = DrafterCost(d.name, d.overhead_seconds, points)
        dplan = {name: set(bs) for name, bs in self.drafter_plan.items()}
        for name, bs in (drafter_plan or {}).items():
            dplan.setdefault(name, set()).update(bs)
        self.refresh()
        return CostModel(
            self.key,
            [*self.samples, *samples],
            merged.values(),
            plan=[*self.plan, *plan],
            drafter_plan=dplan,
            online=self._online_cells(),
            bookkeeping=[*self.bookkeeping, *bookkeeping],
        )

    def _online_cells(self) -> list[tuple[int, int, float, float, float]]:
        return sorted(
            (int(self._bs[i]), int(self._ts[j]), acc[0], acc[1], acc[2])
            for (i, j), acc in self._evidence.items()
            if acc[0] > 0.0
        )

    # -- persistence -----------------------------------------------------------------------

    def to_json(self) -> str:
        """Raw samples, not the fitted grid: a reload refits, so fixes to the fit apply.
        ``plan`` minus the measured cells are the fitted ones (``partial`` says whether there
        are any, or unmeasured drafter batch sizes); ``online`` holds each grid cell's online
        evidence as [B, T, weight, weighted sums of log ratios and of absolute deviations]."""
        doc = {
            "schema": _SCHEMA,
            "key": {"model_id": self.key.model_id, "hardware_id": self.key.hardware_id},
            "verify": [[s.batch_size, s.tokens_per_seq, s.seconds] for s in self.samples],
            "drafters": [
                {
                    "name": m.cost.name,
                    "overhead_seconds": m.cost.overhead_seconds,
                    "per_token": [list(p) for p in m.cost.per_token],
                }
                for m in self._drafters.values()
            ],
            "plan": [list(c) for c in self.plan],
            "drafter_plan": {name: list(bs) for name, bs in sorted(self.drafter_plan.items())},
            "partial": self.partial,
            "online": [list(c) for c in self._online_cells()],
            "bookkeeping": [list(p) for p in self.bookkeeping],
        }
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        """Reads this schema and v1 (a complete table: samples and drafters only)."""
        doc = json.loads(text)
        if doc.get("schema") not in (_SCHEMA, _SCHEMA_V1):
            raise ValueError(f"not a cost model document: schema={doc.get('schema')!r}")
        key = CostTableKey(doc["key"]["model_id"], doc["key"]["hardware_id"])
        samples = [CostSample(int(b), int(t), float(s)) for b, t, s in doc["verify"]]
        drafters = [
            DrafterCost(
                d["name"],
                float(d["overhead_seconds"]),
                tuple((int(b), float(s)) for b, s in d["per_token"]),
            )
            for d in doc["drafters"]
        ]
        plan = [(int(b), int(t)) for b, t in doc.get("plan", [])]
        drafter_plan = {
            str(name): [int(b) for b in bs] for name, bs in doc.get("drafter_plan", {}).items()
        }
        online = [[float(x) for x in cell] for cell in doc.get("online", [])]
        bookkeeping = [(int(b), float(s)) for b, s in doc.get("bookkeeping", [])]
        return cls(
            key,
            samples,
            drafters,
            plan=plan,
            drafter_plan=drafter_plan,
            online=online,
            bookkeeping=bookkeeping,
        )

    def __repr__(self) -> str:
        return (
            f"CostModel({self.key.slug()}, B={[int(b) for b in self._bs]}, "
            f"T={[int(t) for t in self._ts]}, drafters={list(self._drafters)}"
            f"{', partial' if self.partial else ''})"
        )


# -- calibration ---------------------------------------------------------------------------


def calibration_batches(max_batch: int, *, max_points: int = 5) -> list[int]:
    """Batch sizes to measure: 1, then x4 steps, always ending at max_batch.

    Step time is close to piecewise-affine in B with one memory/compute knee; geometric
    spacing places points on both sides of the knee wherever it falls, in few steps.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    out = [1]
    while out[-1] * 4 < max_batch:
        out.append(out[-1] * 4)
    if out[-1] != max_batch:
        out.append(max_batch)
    while len(out) > max(max_points, 2):
        # Drop the interior point whose neighbours are closest (in ratio): least lost.
        i = min(range(1, len(out) - 1), key=lambda j: out[j + 1] / out[j - 1])
        del out[i]
    return out


def calibration_plan(max_batch: int, max_k: int, *, max_points: int = 20) -> list[tuple[int, int]]:
    """The (B, T) grid a worker should time once per model + hardware (~10-20 points).

    T = 1 (plain decode) and T = 2 anchor the cheap end; then T = k + 1 for k in powers of two
    up to max_k, always including max_k + 1 so nothing the selector may choose is
    extrapolated. Order is by B then T; callers should interleave repeats (field notes 6).
    """
    if max_k < 0:
        raise ValueError("max_k must be >= 0")
    ts = {1, max_k + 1}
    k = 1
    while k <= max_k:
        ts.add(k + 1)
        k *= 2
    t_list = sorted(ts)
    bs = calibration_batches(max_batch)
    while len(bs) * len(t_list) > max_points and len(t_list) > 2:
        del t_list[len(t_list) // 2]  # thin T first: cost is close to linear in T
    if len(bs) * len(t_list) > max_points:
        bs = calibration_batches(max_batch, max_points=max(2, max_points // len(t_list)))
    return [(b, t) for b in bs for t in t_list]


def _bisection_ranks(n: int) -> list[int]:
    """Rank of each index of a sorted axis of n values: both ends 0, the middle 1, the
    quarter points 2, ...: the order in which points add most to an interpolation."""
    ranks = [0] * n
    todo = [(0, n - 1, 1)]
    while todo:
        lo, hi, rank = todo.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        ranks[mid] = rank
        todo += [(lo, mid, rank + 1), (mid, hi, rank + 1)]
    return ranks


def calibration_order(plan: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The plan's cells in the order a time-bounded calibration should measure them.

    First the four corners (B = 1 and the largest B, at T = 1 and the largest T): with them
    the fill `Surface` is determined everywhere. Then cells by bisection of the B and T axes
    (a middle B before a quarter B), new batch sizes before new T values (cost is close to
    linear in T, so T is the cheaper axis to interpolate), and within a rank the cheaper
    cell (smaller B x T) first, so that more cells fit in what is left of the budget.
    """
    cells = sorted(set(plan))
    bs = sorted({b for b, _ in cells})
    ts = sorted({t for _, t in cells})
    rank_b = dict(zip(bs, _bisection_ranks(len(bs)), strict=True))
    rank_t = dict(zip(ts, _bisection_ranks(len(ts)), strict=True))
    return sorted(
        cells,
        key=lambda c: (max(rank_b[c[0]], rank_t[c[1]]), rank_t[c[1]], rank_b[c[0]], c[0] * c[1]),
    )


# -- synthetic models (tests, simulator) -----------------------------------------------------


@dataclass(frozen=True)
class Roofline:
    """t(B, T) = max(memory_floor, B * T * per_token) + overhead.

    memory_floor: time to stream the weights once (the step cost while memory-bound);
    per_token: compute time per verified token once compute-bound; overhead: fixed launch /
    scheduling cost per step.
    """

    memory_floor_seconds: float = 0.010
    per_token_seconds: float = 0.0002
    overhead_seconds: float = 0.001

    def __call__(self, batch: int, tokens_per_seq: int) -> float:
        compute = batch * tokens_per_seq * self.per_token_seconds
        return max(self.memory_floor_seconds, compute) + self.overhead_seconds


def _half_octaves(max_batch: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... : dense enough that interpolating a roofline between
    points stays within ~10% of the formula at its knee and exact elsewhere."""
    out: set[int] = {max_batch}
    b = 1
    while b <= max_batch:
        out.add(b)
        if b >= 2 and b * 3 // 2 <= max_batch:
            out.add(b * 3 // 2)
        b *= 2
    return sorted(out)


def synthetic_cost_model(
    roofline: Roofline | None = None,
    *,
    drafters: Iterable[DrafterCost] = (),
    max_batch: int = 256,
    max_k: int = 16,
    key: CostTableKey | None = None,
) -> CostModel:
    """A `CostModel` sampled from a roofline formula on a dense grid (every T up to max_k + 1,
    half-octave B up to max_batch), so it agrees with the formula at those points exactly and
    in between to within ~10% (only near the knee). For tests and the simulator."""
    rf = roofline or Roofline()
    samples = [
        CostSample(b, t, rf(b, t)) for b in _half_octaves(max_batch) for t in range(1, max_k + 2)
    ]
    return CostModel(key or CostTableKey("synthetic", "roofline"), samples, drafters)


def drafter_from_roofline(
    name: str, roofline: Roofline, batches: Iterable[int], *, overhead_seconds: float = 0.0
) -> DrafterCost:
    """A draft-model drafter whose one-token forward at batch B costs roofline(B, 1)."""
    return DrafterCost(name, overhead_seconds, tuple((b, roofline(b, 1)) for b in batches))
