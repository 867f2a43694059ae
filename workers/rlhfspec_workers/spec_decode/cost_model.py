"""Cost model of one engine step: what a (drafter, k) choice costs at batch size B.

Place in the flow: a generation worker measures a small grid of step times once per
(model, hardware) at start-up (`calibration_grid.calibration_plan` says which,
`calibration_grid.calibration_order` in which order, within a time budget), fits a
`CostModel`, caches it as JSON under a `CostTableKey`, and hands it to the selector. The
selector asks it, many times per decode step, for `step_seconds(drafter, B, k)` = verification
of k+1 tokens per sequence plus k draft forwards. While the job runs, the worker feeds each
real engine step back (`CostModel.observe_verify`, kept per grid cell by `cost_online`), so
what calibration could not measure, or measured on short probe prompts, converges to what
real steps cost; the refined table goes back to the cache.

Partial tables: a budget may end calibration before every planned cell is measured. The
table then records its plan; the cells without measurements are filled by a fitted
`cost_surface.Surface` (non-negative a + b*B + c*T + d*B*T, corrected by the nearby
measurements), so every (B, k) the selector may ask for is covered, and a later worker
measures only what is still missing. Why measured cells are interpolated rather than fitted
to a formula: see `cost_surface`. Pure standard library: this runs inside the coordinator and
in CPU-only tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .cost_online import KNOWN_EVIDENCE, REFIT_EVERY, OnlineEvidence
from .cost_records import OFF, CostSample, CostTableKey, DrafterCost, bookkeeping_at
from .cost_surface import (
    MonotoneCurve,
    fill_unmeasured,
    grid_value,
    make_monotone,
    shrink_to_surface,
)
from .draft_cost_online import OnlineDraftCost, StoredCell
from .grid_query import CACHE_LIMIT, GridQuery

_SCHEMA_V1 = "rlhfspec.spec_decode.cost_model/v1"
_SCHEMA = "rlhfspec.spec_decode.cost_model/v2"


@dataclass(frozen=True)
class _DrafterModel:
    cost: DrafterCost
    per_token: MonotoneCurve
    planned: bool
    """Calibration meant to measure it: with no point measured it is not free (see
    `CostModel.draft_seconds`)."""


UNMEASURED_DRAFT_SHARE = 0.25
"""A drafter calibration meant to measure but never reached costs this share of a plain
decode step per draft token: pessimistic (never free, or it would always win), and the
drafter can still win where acceptance is high."""


class CostModel:
    """Monotone interpolated step-cost surface verify(B, T) plus per-drafter draft costs.

    Fit: samples are grouped per (B, T) and reduced to their median (robust to the 2-3x
    stalls other processes cause on a shared machine: docs/cpu-notes.md §5), shrunk towards
    the fitted `Surface` by as much as the repeats say they are noise
    (`cost_surface.shrink_to_surface`: a noisy CPU's cells take the surface's shape, a clean
    GPU's keep their knees). The grid is the
    union of the measured cells and the *plan* (the cells calibration meant to measure; by
    default the measured ones); planned cells calibration did not reach are filled by
    `fill_unmeasured` (a fitted `Surface` corrected by nearby measurements). Each B row is made
    non-decreasing in T and then each T column non-decreasing in B. Query: bilinear in (B, T),
    linear extrapolation past the grid.

    Why linear in B rather than log B: within one regime a step is close to affine in B
    (weights read once, then per-sequence KV reads and per-token compute: a 58M Llama step on
    a 2-core CPU took 6.3 / 7.3 / 11.6 / 27.8 ms for B = 1 / 4 / 16 / 64, nearly a + b*B;
    docs/cpu-notes.md §3), so linear
    interpolation is exact inside a regime and errs only across a knee, where the chord of a
    convex curve overestimates (the safe side: a too-small k costs little). Log-B interpolation
    overestimates a compute-bound segment by up to 25% at 4x grid spacing.

    Online learning (`observe_verify`): real engine steps refine the table while a job runs;
    their corrections are kept per grid cell by `cost_online.OnlineEvidence` and the queried
    grid is the calibrated one corrected by them; measured drafting calls correct a draft
    model's drafting cost alike (`observe_draft`, `draft_cost_online`). Everything else about
    an instance is fixed after construction; the online state is saved with it (`to_json`).
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
        draft_online: Iterable[StoredCell] = (),
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
            self._drafters[d.name] = _DrafterModel(d, MonotoneCurve.fit(d.per_token), planned)
        self._bs, self._ts, self._base, self._measured = self._fit_grid(self.samples, self.plan)
        self._online = OnlineEvidence(self._bs, self._ts, self._measured)
        for cell in online:
            self._online.absorb(*(float(x) for x in cell))
        self._draft_online = OnlineDraftCost(draft_online)
        self._query = GridQuery(self._bs, self._ts, self._base)
        """The current grid (calibrated, corrected by online evidence), as queried."""
        self._draft_cache: dict[tuple[str, int, int], float] = {}
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
        cells = shrink_to_surface(by_cell)
        bs = sorted({b for b, _ in cells} | {b for b, _ in plan})
        ts = sorted({t for _, t in cells} | {t for _, t in plan})
        filled = fill_unmeasured(cells, [(b, t) for b in bs for t in ts])
        grid = make_monotone(
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

    def verify_seconds(self, batch: int, k: int) -> float:
        """Step time verifying k draft tokens (T = k + 1 tokens) for each of `batch` sequences."""
        if batch < 1 or k < 0:
            raise ValueError(f"need batch >= 1 and k >= 0, got {batch}, {k}")
        return self._query.at_k(batch, k)

    def verify_tokens_seconds(self, batch: int, tokens_per_seq: float) -> float:
        """Step time verifying a mean of ``tokens_per_seq`` (>= 1, fractional) tokens per
        sequence: rows with short or no drafts verify fewer tokens, and the step costs about
        what its total token count costs."""
        if batch < 1 or tokens_per_seq < 1.0:
            raise ValueError(f"need batch >= 1 and tokens >= 1, got {batch}, {tokens_per_seq}")
        return self._query.at_tokens(batch, tokens_per_seq)

    def calibrated_seconds(self, batch: float, tokens_per_seq: float) -> float:
        """verify(B, T) as calibration left it (measured + fitted), without online evidence."""
        return grid_value(self._bs, self._ts, self._base, batch, tokens_per_seq)

    def draft_seconds(self, drafter: str, batch: int, k: int) -> float:
        """Cost of proposing k tokens per sequence: the calibrated cost, corrected by what
        measured drafting calls said (:meth:`observe_draft`)."""
        cached = self._draft_cache.get((drafter, batch, k))
        if cached is not None:
            return cached
        value = self.calibrated_draft_seconds(drafter, batch, k)
        if value > 0.0:
            value *= math.exp(self._draft_online.correction(drafter, batch, k))
        if len(self._draft_cache) < CACHE_LIMIT:  # asked for every (drafter, k) every step
            self._draft_cache[(drafter, batch, k)] = value
        return value

    def calibrated_draft_seconds(self, drafter: str, batch: int, k: int) -> float:
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
        return self._online.weight_around(batch, tokens_per_seq)

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
        self._online.observe(float(batch), tokens_per_seq, math.log(seconds / base))
        self.observations += 1
        self._unfolded += 1
        if self._unfolded >= REFIT_EVERY:
            self.refresh()

    def observe_draft(self, drafter: str, batch: int, k: int, seconds: float) -> None:
        """Learn from one measured drafting call, the proposer's whole call (``seconds``;
        ``draft_cost_online``). Calibration charges a drafter what its calls add to the
        proposer's own bookkeeping, which every verification sample holds, so that part is
        taken off first. Only for a drafter calibrated from measured calls (a draft model):
        a model-free drafter's lookups are priced by its overhead alone."""
        model = self._drafters.get(drafter)
        if model is None or not model.cost.per_token or k < 1 or batch < 1:
            return
        base = self.calibrated_draft_seconds(drafter, batch, k)
        added = seconds - bookkeeping_at(dict(self.bookkeeping), batch)
        if base > 0.0 and added > 0.0 and math.isfinite(added):
            self._draft_online.observe(drafter, batch, k, math.log(added / base))
            self._draft_cache.clear()

    def refresh(self) -> None:
        """Rebuild the queried grid from the calibrated one and the online evidence."""
        self._unfolded = 0
        self._query = GridQuery(self._bs, self._ts, self._online.corrected(self._base))
        self._draft_cache.clear()

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
            online=self._online.stored(),
            bookkeeping=[*self.bookkeeping, *bookkeeping],
            draft_online=self._draft_online.stored(),
        )

    # -- persistence -----------------------------------------------------------------------

    def to_json(self) -> str:
        """Raw samples, not the fitted grid: a reload refits, so fixes to the fit apply.
        ``plan`` minus the measured cells are the fitted ones (``partial`` says whether there
        are any, or unmeasured drafter batch sizes); ``online`` holds each grid cell's online
        evidence as [B, T, weight, weighted sums of log ratios and of absolute deviations],
        ``draft_online`` the drafting calls' (``draft_cost_online.StoredCell``)."""
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
            "online": [list(c) for c in self._online.stored()],
            "bookkeeping": [list(p) for p in self.bookkeeping],
            "draft_online": [list(c) for c in self._draft_online.stored()],
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
        draft_online = [
            (str(d), int(k), int(c), float(w), float(t))
            for d, k, c, w, t in doc.get("draft_online", [])
        ]
        return cls(
            key,
            samples,
            drafters,
            plan=plan,
            drafter_plan=drafter_plan,
            online=online,
            bookkeeping=bookkeeping,
            draft_online=draft_online,
        )

    def __repr__(self) -> str:
        return (
            f"CostModel({self.key.slug()}, B={[int(b) for b in self._bs]}, "
            f"T={[int(t) for t in self._ts]}, drafters={list(self._drafters)}"
            f"{', partial' if self.partial else ''})"
        )
