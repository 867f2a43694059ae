"""Cost model of one engine step: what a (drafter, k) choice costs at batch size B.

Place in the flow: a generation worker measures a small grid of step times once per
(model, hardware) at start-up (`calibration_plan` says which), fits a `CostModel`, caches it as
JSON under a `CostTableKey`, and hands it to the selector. The selector asks it, many times per
decode step, for `step_seconds(drafter, B, k)` = verification of k+1 tokens per sequence plus
k draft forwards.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

OFF = "off"
"""Drafter name meaning "no speculation" (k = 0)."""

_SCHEMA = "rlhfspec.spec_decode.cost_model/v1"


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


def _isotonic(values: Sequence[float]) -> list[float]:
    """Pool-adjacent-violators: the closest non-decreasing sequence (least squares).

    Why not a running max: one noisy high sample would lift every later point; pooling
    averages it with its neighbours instead. It is also order-preserving (larger inputs give
    larger outputs), which keeps rows monotone when we then fix the columns.
    """
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: list[float] = []
    for s, c in blocks:
        out.extend([s / c] * int(c))
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


class CostModel:
    """Monotone interpolated step-cost surface verify(B, T) plus per-drafter draft costs.

    Fit: samples are grouped per (B, T) and reduced to their median (robust to the 2-3x
    stalls a shared machine produces, field notes 6); each B row is made non-decreasing in T,
    completed onto the union of measured T values, and then each T column is made
    non-decreasing in B. Query: bilinear in (B, T), linear extrapolation past the grid.

    Why linear in B rather than log B: within one regime a step is close to affine in B
    (weights read once, then per-sequence KV reads and per-token compute: field notes 6 has
    t50 at 6.3 / 7.3 / 11.6 / 27.8 ms for B = 1 / 4 / 16 / 64, nearly a + b*B), so linear
    interpolation is exact inside a regime and errs only across a knee, where the chord of a
    convex curve overestimates (the safe side: a too-small k costs little). Log-B interpolation
    overestimates a compute-bound segment by up to 25% at 4x grid spacing.
    Build with `CostModel.fit`; instances are treated as immutable.
    """

    def __init__(
        self,
        key: CostTableKey,
        samples: Sequence[CostSample],
        drafters: Iterable[DrafterCost] = (),
    ) -> None:
        if not samples:
            raise ValueError("a cost model needs at least one verification sample")
        self.key = key
        self.samples: tuple[CostSample, ...] = tuple(samples)
        self._drafters: dict[str, _DrafterModel] = {}
        for d in drafters:
            if d.name in self._drafters:
                raise ValueError(f"drafter {d.name!r} given twice")
            self._drafters[d.name] = _DrafterModel(d, _Curve.fit(d.per_token))
        self._bs, self._ts, self._grid = self._fit_grid(self.samples)
        self._cache: dict[tuple[int, int], float] = {}

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
        samples: Sequence[CostSample],
    ) -> tuple[tuple[float, ...], tuple[float, ...], tuple[tuple[float, ...], ...]]:
        cells: dict[int, dict[int, list[float]]] = {}
        for s in samples:
            cells.setdefault(s.batch_size, {}).setdefault(s.tokens_per_seq, []).append(s.seconds)
        bs = sorted(cells)
        ts = sorted({t for row in cells.values() for t in row})
        grid: list[list[float]] = []
        for b in bs:
            row_ts = sorted(cells[b])
            row_ys = _isotonic([statistics.median(cells[b][t]) for t in row_ts])
            row_xs = [float(t) for t in row_ts]
            # A row missing some T is completed from its own measured points.
            grid.append([_interp(row_xs, row_ys, t) for t in ts])
        for j in range(len(ts)):
            column = _isotonic([row[j] for row in grid])
            for i, v in enumerate(column):
                grid[i][j] = v
        return (
            tuple(float(b) for b in bs),
            tuple(float(t) for t in ts),
            tuple(tuple(row) for row in grid),
        )

    # -- queries ---------------------------------------------------------------------------

    @property
    def drafters(self) -> tuple[str, ...]:
        return tuple(self._drafters)

    def verify_seconds(self, batch: int, k: int) -> float:
        """Step time verifying k draft tokens (T = k + 1 tokens) for each of `batch` sequences."""
        if batch < 1 or k < 0:
            raise ValueError(f"need batch >= 1 and k >= 0, got {batch}, {k}")
        cached = self._cache.get((batch, k))
        if cached is not None:
            return cached
        t = float(k + 1)
        rows = [_interp(self._ts, row, t) for row in self._grid]
        # Rows extrapolated in T with different slopes could cross; a running max over B keeps
        # the surface monotone there too (inside the grid it is already monotone).
        for i in range(1, len(rows)):
            rows[i] = max(rows[i], rows[i - 1])
        value = _interp(self._bs, rows, float(batch))
        if len(self._cache) < 65536:  # the selector asks the same (B, k) every step
            self._cache[(batch, k)] = value
        return value

    def draft_seconds(self, drafter: str, batch: int, k: int) -> float:
        """Cost of proposing k tokens per sequence: overhead + k draft forwards; 0 when k = 0."""
        if k == 0 or drafter == OFF:
            return 0.0
        if batch < 1 or k < 0:
            raise ValueError(f"need batch >= 1 and k >= 0, got {batch}, {k}")
        try:
            model = self._drafters[drafter]
        except KeyError:
            # Never guess "free" for an uncalibrated drafter: that would make it always win.
            raise KeyError(f"drafter {drafter!r} not calibrated in {self.key.slug()}") from None
        return model.cost.overhead_seconds + k * model.per_token(float(batch))

    def step_seconds(self, drafter: str, batch: int, k: int) -> float:
        """One whole engine step: draft k tokens, then verify k + 1 per sequence."""
        k_eff = 0 if drafter == OFF else k
        return self.verify_seconds(batch, k_eff) + self.draft_seconds(drafter, batch, k_eff)

    # -- persistence -----------------------------------------------------------------------

    def to_json(self) -> str:
        """Raw samples, not the fitted grid: a reload refits, so fixes to the fit apply."""
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
        }
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        doc = json.loads(text)
        if doc.get("schema") != _SCHEMA:
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
        return cls(key, samples, drafters)

    def __repr__(self) -> str:
        return (
            f"CostModel({self.key.slug()}, B={[int(b) for b in self._bs]}, "
            f"T={[int(t) for t in self._ts]}, drafters={list(self._drafters)})"
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
