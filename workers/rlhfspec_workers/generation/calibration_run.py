"""The budgeted start-up calibration: which probes to run, in which order, and when to stop.

Place in the flow: ``cost_table.calibrated_cost_model`` calls :func:`calibrate_engine` when no
cached table covers the engine (or to continue a partial one). It orders the probes (the
corners of the verification grid first, drafters interleaved), runs ``calibrate.py``'s
:func:`~rlhfspec_workers.generation.calibrate.probe` for each while its predicted time fits
what is left of :data:`CALIBRATION_BUDGET_SECONDS`, and builds ``spec_decode.CostModel`` from
what it measured; what the budget did not reach stays in the table's plan, to be fitted and
measured by a later worker. :func:`calibration_max_batch` caps the batch sizes at what the
engine's slots and KV cache run at once.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlhfspec_workers.drafters.base import DraftRow
from rlhfspec_workers.spec_decode.calibration_grid import calibration_order, calibration_plan
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import (
    OFF,
    CostSample,
    CostTableKey,
    DrafterCost,
    bookkeeping_at,
)

from .cost_cache import cost_table_key
from .draft_strategy import DraftChoice

if TYPE_CHECKING:  # the engine imports vLLM; loading a cached table must not need it
    from .engine import GenerationEngine

FILL = "fill"
"""calibrate.py's probe drafter name (it installs its own unless one is registered)."""

CALIBRATION_BUDGET_SECONDS = 45.0
"""Wall-time budget of one worker's start-up calibration. What it does not reach is fitted
(``spec_decode.cost_surface.Surface``) and refined by real steps while the job runs."""
STEADY_STEPS = 3
"""Steady steps per probe (median); fewer when only fewer fit in what is left."""
PROBE_PROMPT_LEN = 8
"""Probe prompt length: short, since prefilling B prompts is the costliest part of a probe at a
large B; real steps (longer contexts) correct the table online."""


def _max_num_seqs(engine: GenerationEngine) -> int:
    return int(engine.engine.vllm_config.scheduler_config.max_num_seqs)


def kv_capacity(engine: GenerationEngine, tokens_per_seq: int) -> int | None:
    """How many sequences of ``tokens_per_seq`` tokens the engine's KV cache holds at once
    (None if vLLM does not say). A batch beyond it never runs: the rest wait."""
    cache = engine.engine.vllm_config.cache_config
    blocks = getattr(cache, "num_gpu_blocks", None)
    block_size = getattr(cache, "block_size", None)
    if not blocks or not block_size:
        return None
    # One block is vLLM's reserved null block.
    usable = int(blocks) - 1
    return max(1, usable // max(1, math.ceil(tokens_per_seq / int(block_size))))


def calibration_max_batch(
    engine: GenerationEngine, max_batch: int | None = None, prompt_len: int = PROBE_PROMPT_LEN
) -> int:
    """The largest batch worth calibrating: ``max_batch`` (default: the engine's slots), at
    most the slots, and at most what the KV cache holds for a probe's sequences."""
    slots = _max_num_seqs(engine)
    cap = min(max_batch or slots, slots)
    probe_tokens = prompt_len + (STEADY_STEPS + 2) * (engine.max_k + 1)
    fits = kv_capacity(engine, probe_tokens)
    return max(1, min(cap, fits) if fits is not None else cap)


class RejectedFillDrafter:
    """Verification probe: k copies of a token the target practically never predicts (its
    padding token). Every draft is rejected, so each probe step emits one token per row and
    rows keep their full draft budget for the whole probe. calibrate.py's default probe copies
    the last token, which a sorting or repetitive policy often accepts; rows then run out of
    max_tokens early and large k is never measured."""

    name = FILL

    def __init__(self, token: int) -> None:
        self.token = token

    def propose(self, rows: Sequence[DraftRow], k: int) -> list[list[int]]:
        return [[self.token] * min(k, r.max_k) for r in rows]

    def release(self, req_ids: Iterable[str]) -> None:
        pass


@dataclass(frozen=True)
class _Task:
    kind: str  # "verify" | "draft"
    batch_size: int
    tokens_per_seq: int  # verify: T = k + 1 verified per row; draft: k + 1 with k drafted
    drafter: str = FILL


@dataclass
class CalibrationReport:
    """What a time-bounded calibration did (logs and tests)."""

    planned: list[tuple[str, str, int, int]] = field(default_factory=list)
    """(kind, drafter, B, T) of every probe it meant to run, in order."""
    measured: list[tuple[str, str, int, int]] = field(default_factory=list)
    skipped: list[tuple[str, str, int, int]] = field(default_factory=list)
    """Probes not run (or cut before one steady step) because the budget could not fit them."""
    capacity: int | None = None
    """Set when a probe found the engine running fewer rows at once than planned."""
    probe_seconds: list[float] = field(default_factory=list)
    """Wall time of each probe run (measured or cut), in order."""
    seconds: float = 0.0


_estimates: dict[tuple[CostSample, ...], CostModel] = {}


def _estimate(
    known: Sequence[CostSample], batch_size: int, tokens_per_seq: int, prompt_len: int
) -> Callable[[int], float] | None:
    """Predicted wall seconds of a probe with n steady steps, from the cells measured so far:
    a prefill of B x prompt_len tokens, a warm-up step and n steady ones. None until the
    measurements span two batch sizes and two T values (before that a guess would be wild;
    the first probes rely on the deadline alone)."""
    if len({s.batch_size for s in known}) < 2 or len({s.tokens_per_seq for s in known}) < 2:
        return None
    cells = tuple(known)
    fit = _estimates.get(cells)
    if fit is None:  # one fit per set of measurements (a fit with fitted cells takes ~20 ms)
        _estimates.clear()
        largest = (max(s.batch_size for s in cells), max(s.tokens_per_seq for s in cells))
        fit = _estimates[cells] = CostModel(CostTableKey("estimate", "-"), cells, plan=[largest])
    step = fit.verify_seconds(batch_size, tokens_per_seq - 1)
    prefill = fit.verify_seconds(batch_size, max(prompt_len - 1, 0))
    return lambda n: prefill + (1 + n) * step


def _order_tasks(
    verify: Sequence[tuple[int, int]], drafters: Mapping[str, Sequence[int]], draft_tokens: int
) -> list[_Task]:
    """Verification corners first, then every drafter at the smallest batch (cheap), the first
    half of the remaining cells, the drafters at the largest batch, the rest of the cells, the
    drafters' other batch sizes."""
    cells = calibration_order(verify)
    bs = [b for b, _ in cells]
    ts = [t for _, t in cells]
    corner = {b for b in (min(bs, default=0), max(bs, default=0))}
    corner_t = {t for t in (min(ts, default=0), max(ts, default=0))}
    head = [c for c in cells if c[0] in corner and c[1] in corner_t][:4]
    rest = [c for c in cells if c not in head]
    half = (len(rest) + 1) // 2

    def draft_at(pick: Callable[[Sequence[int]], Sequence[int]]) -> list[_Task]:
        return [
            _Task("draft", b, draft_tokens, name)
            for name, batches in drafters.items()
            for b in pick(sorted(batches))
        ]

    tasks = [_Task("verify", b, t) for b, t in head]
    tasks += draft_at(lambda bs: bs[:1])
    tasks += [_Task("verify", b, t) for b, t in rest[:half]]
    tasks += draft_at(lambda bs: bs[-1:] if len(bs) > 1 else [])
    tasks += [_Task("verify", b, t) for b, t in rest[half:]]
    tasks += draft_at(
        lambda bs: [
            b for _, b in sorted(zip(_ranks(bs), bs, strict=True)) if b not in (bs[0], bs[-1])
        ]
    )
    return tasks


def _ranks(batches: Sequence[int]) -> list[int]:
    """Bisection rank per batch size (ends first), as calibration_order ranks an axis."""
    order = calibration_order([(b, 1) for b in batches])
    pos = {b: i for i, (b, _) in enumerate(order)}
    return [pos[b] for b in batches]


def calibrate_engine(
    engine: GenerationEngine,
    *,
    key: CostTableKey | None = None,
    max_batch: int | None = None,
    repeats: int = 1,
    prompt_len: int = PROBE_PROMPT_LEN,
    budget_seconds: float = CALIBRATION_BUDGET_SECONDS,
    start: CostModel | None = None,
    report: CalibrationReport | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CostModel:
    """Measure the cost model on the running engine (adaptive proposer required) within
    ``budget_seconds``; continue ``start`` (a partial table of the same key) if given.

    Costs are split so that ``step_seconds(d, B, k)`` is a whole engine step: a verification
    sample is a whole probe step (the proposer's own per-step bookkeeping included, drafting
    the fill probe's free tokens being negligible) and a drafter is charged only what its
    drafting adds to that bookkeeping (measured in the same step by the verification probes
    at that B).

    Deadline: probes run in ``_order_tasks``' order; before each one, once two batch sizes and
    two T values are known, its time is predicted from the cells measured so far and a probe
    that cannot fit what is left is skipped (a cheaper one later may still fit); a running
    probe stops at the deadline. The first probe of a table (B = 1, plain decoding, which
    also pays the engine's first-forward warm-up) runs to the end whatever the budget: a
    table needs one measured cell. Cells and drafter batch sizes not measured stay in the
    table's plan: they are fitted, refined online, and measured by a later calibration."""
    from .calibrate import ProbeResult, probe

    proposer = engine.proposer
    if proposer is None:
        raise RuntimeError("calibration needs the adaptive proposer (speculative mode not off)")
    started = clock()
    deadline = started + budget_seconds
    max_k = engine.max_k
    max_batch = calibration_max_batch(engine, max_batch, prompt_len)
    plan = calibration_plan(max_batch, max_k)
    batches = sorted({b for b, _ in plan})
    drafter_plan = {name: batches for name in engine.drafters}
    draft_k = max(1, max_k // 2)
    if start is not None:
        todo = set(plan) | {c for c in start.plan if c[0] <= max_batch and c[1] <= max_k + 1}
        todo &= set(start.missing())
        missing = start.missing_drafter_batches()
        want = {
            name: [b for b in batches if b in missing.get(name, ()) or name not in start.drafters]
            for name in engine.drafters
        }
        drafter_todo = {name: bs for name, bs in want.items() if bs}
    else:
        todo = set(plan)
        drafter_todo = dict(drafter_plan)
    tasks = _order_tasks(sorted(todo), drafter_todo, draft_k)
    tasks += [_Task("verify", b, t) for _ in range(repeats - 1) for b, t in calibration_order(plan)]
    report = report if report is not None else CalibrationReport()
    known: list[CostSample] = list(start.samples) if start is not None else []
    samples: list[CostSample] = []
    base: dict[int, list[float]] = {}
    drafted: dict[str, list[tuple[int, float]]] = {}
    capacity = max_batch
    done: list[_Task] = []
    pad = getattr(engine.engine.model_config.hf_config, "pad_token_id", None)
    proposer.drafters[FILL] = RejectedFillDrafter(int(pad) if pad is not None else 0)
    try:
        for task in tasks:
            label = (task.kind, task.drafter, task.batch_size, task.tokens_per_seq)
            report.planned.append(label)
            batch_size = min(task.batch_size, capacity)
            if batch_size < task.batch_size and any(
                t.kind == task.kind
                and t.drafter == task.drafter
                and (t.batch_size, t.tokens_per_seq) == (batch_size, task.tokens_per_seq)
                for t in done
            ):
                report.skipped.append(label)  # the same probe at the capacity already ran
                continue
            left = deadline - clock()
            estimate = _estimate(known, batch_size, task.tokens_per_seq, prompt_len)
            steady = STEADY_STEPS
            if estimate is not None:
                while steady > 0 and estimate(steady) > left:
                    steady -= 1
            first = not known  # nothing at all yet: one cell is measured whatever the budget
            if (left <= 0 or steady == 0) and not first:
                report.skipped.append(label)
                continue
            k = task.tokens_per_seq - 1
            if task.kind == "verify":
                choice = DraftChoice(FILL, k) if k > 0 else DraftChoice(OFF, 0)
            else:
                choice = DraftChoice(task.drafter, k)
            done.append(_Task(task.kind, batch_size, task.tokens_per_seq, task.drafter))
            result: ProbeResult = probe(
                engine,
                choice,
                batch_size,
                steady=max(steady, 1) if left > 0 else 1,
                prompt_len=prompt_len,
                deadline=None if first else deadline,
                measure=task.kind,
                clock=clock,
            )
            report.probe_seconds.append(result.wall_seconds)
            step, draft = result.step, result.draft
            if result.batch_size < batch_size:
                # The engine could not run that many rows at once: nothing larger is measured
                # (the plan shrinks to it below); what ran is this batch's measurement.
                report.capacity = capacity = result.batch_size
            if step is None or draft is None:
                report.skipped.append(label)
                continue
            report.measured.append(label)
            if task.kind == "verify":
                sample = CostSample(result.batch_size, task.tokens_per_seq, step)
                samples.append(sample)
                known.append(sample)
                base.setdefault(result.batch_size, []).append(draft)
            else:
                drafted.setdefault(task.drafter, []).append((result.batch_size, draft))
    finally:
        proposer.drafters.pop(FILL, None)
    if capacity < max_batch:
        plan = sorted({(min(b, capacity), t) for b, t in plan})
        batches = sorted({min(b, capacity) for b in batches})
        drafter_plan = {name: batches for name in engine.drafters}
    measured_base = tuple(sorted((b, statistics.median(v)) for b, v in base.items()))
    if start is not None:  # an earlier run's bookkeeping serves this run's drafter points too
        for b, seconds in start.bookkeeping:
            base.setdefault(b, []).append(seconds)
    bookkeeping = {b: statistics.median(v) for b, v in base.items()}
    drafters = [
        DrafterCost(
            name,
            0.0,
            tuple(
                (b, max(0.0, seconds - bookkeeping_at(bookkeeping, b)) / draft_k)
                for b, seconds in drafted.get(name, [])
            ),
        )
        for name in engine.drafters
        if start is None or drafted.get(name) or name not in start.drafters
    ]
    report.seconds = clock() - started
    if start is not None:
        return start.extended(
            samples, drafters, plan=plan, drafter_plan=drafter_plan, bookkeeping=measured_base
        )
    if not samples:
        raise CalibrationError("calibration measured nothing (no steady step at B=1)")
    return CostModel(
        key or cost_table_key(engine),
        samples,
        drafters,
        plan=plan,
        drafter_plan=drafter_plan,
        bookkeeping=measured_base,
    )


class CalibrationError(RuntimeError):
    """Calibration could not measure a single cell within its budget."""
