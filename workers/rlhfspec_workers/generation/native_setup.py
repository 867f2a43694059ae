"""A generation worker's set-up for ``selector.execution: native``: vLLM's own drafter, our k.

Where it sits: ``worker.run`` builds the engine with ``native=True`` (vLLM's own drafter, the
job's one listed drafter, with a Dynamic SD lookup) and calls :func:`native_strategy` where
other modes call ``adaptive.make_strategy``; the strategy it returns goes to the worker like
any other (step records, the coordinator's broadcasts). ``native_schedule.NativeSchedule``
then keeps vLLM's lookup at the selector's k per batch size, step by step.

The cost table: on the native path vLLM drafts inside the step, so the selector prices a step
at verify(B, k + 1) with the drafter free, and the table's cells are whole native steps.
Calibration (:func:`calibrate_native`) times them by writing one k into the lookup for every
batch size and running short probes; the ``CostLearner`` keeps refining the same cells from
every step of the job. The table is cached like the proposer path's (same directory, its own
key: :func:`native_table_key`), so a worker starting on a model and machine already measured
skips the probes, and the refined table goes back to the cache as the job runs. The two kinds
never share a file: the proposer path's cells are verification alone, drafters apart.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhfspec_api.generation import GenerationSpec
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import CostSample, CostTableKey, DrafterCost

from .adaptive import AdaptiveStrategy, CostLearner, adaptive_strategy_for
from .calibrate import probe_prompts, vocab_size
from .calibration_run import calibration_max_batch
from .cost_cache import (
    cache_file,
    cached_cost_model,
    cost_table_key,
    default_cache_dir,
    store_cost_model,
)
from .cost_table import uncalibrated_cost_model
from .engine import GenerationEngine
from .native_schedule import NativeSchedule
from .records import SamplingConfig

logger = logging.getLogger(__name__)

PROBE_BATCHES = (1, 4, 16, 64, 256)
PROBE_KS = (0, 1, 2, 4, 8)
PROBE_STEPS = 3
"""Steady steps per probe (median), after one warm-up step."""
PROBE_PROMPT_LEN = 8
NATIVE_CALIBRATION_SECONDS = 45.0
"""The same start-up budget as the proposer path's calibration."""


def calibrate_native(
    engine: GenerationEngine,
    *,
    max_batch: int,
    budget_seconds: float = NATIVE_CALIBRATION_SECONDS,
    batches: Sequence[int] = PROBE_BATCHES,
    ks: Sequence[int] = PROBE_KS,
    clock: Callable[[], float] = time.monotonic,
) -> list[CostSample]:
    """One sample per (B, k) probe that fits the budget: the median seconds of a native step
    of B rows each verifying k draft tokens (drafting included). Smallest batches first, so a
    short budget still spans k; the lookup is restored afterwards."""
    lookup = engine.dynamic_sd_lookup()
    saved = list(lookup)
    deadline = clock() + budget_seconds
    top = calibration_max_batch(engine, max_batch, PROBE_PROMPT_LEN)  # slots and KV cache
    sizes = sorted({min(b, top) for b in batches})
    samples: list[CostSample] = []
    try:
        for b in sizes:
            for k in sorted({min(k, engine.max_k) for k in ks}):
                if clock() >= deadline:
                    return samples
                lookup[1:] = [k] * (len(lookup) - 1)
                seconds = _probe(engine, b, k)
                if seconds:
                    samples.append(CostSample(b, k + 1, statistics.median(seconds)))
    finally:
        lookup[:] = saved
    return samples


def _probe(engine: GenerationEngine, batch_size: int, k: int) -> list[float]:
    engine.drain_steps()
    prompts = probe_prompts(batch_size, PROBE_PROMPT_LEN, vocab_size(engine))
    # Greedy with real drafts: rows advance up to k + 1 tokens a step; room for every step.
    tokens = (PROBE_STEPS + 3) * (k + 1) + 2
    engine.generate_all(
        prompts, SamplingConfig(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    )
    steady = [
        r.step_seconds
        for r in engine.drain_steps()
        if r.batch_size == batch_size
        and r.num_finished == 0
        and r.prefill_tokens == 0
        and r.num_draft_tokens == batch_size * k
    ]
    return steady[1 : 1 + PROBE_STEPS]


def native_table_key(engine: GenerationEngine, drafter: str) -> CostTableKey:
    """The proposer path's key (model, drafters, step path; hardware) marked native and
    with the drafter vLLM runs: the same model's two kinds of table never share a file."""
    base = cost_table_key(engine)
    return CostTableKey(f"{base.model_id}:native-{drafter}", base.hardware_id)


def _spans(samples: Sequence[CostSample]) -> bool:
    return (
        len({s.batch_size for s in samples}) >= 2 and len({s.tokens_per_seq for s in samples}) >= 2
    )


def native_cost_model(
    samples: Sequence[CostSample], engine: GenerationEngine, drafter: str
) -> CostModel:
    """The native table: the probes' whole steps, the drafter free; with too few probes (no
    budget, calibration off) the generic roofline, which real steps then correct."""
    if _spans(samples):
        return CostModel(native_table_key(engine, drafter), samples, [DrafterCost(drafter)])
    return uncalibrated_cost_model([drafter], engine.max_k)


def _covers(model: CostModel, engine: GenerationEngine, max_batch: int) -> bool:
    """A cached native table serves this engine when its probes spanned two batch sizes and
    two k, and reached the largest probe batch this engine would measure (a table measured
    for smaller batches, or cut short by its budget, is measured again)."""
    top = calibration_max_batch(engine, max_batch, PROBE_PROMPT_LEN)
    largest = max(min(b, top) for b in PROBE_BATCHES)
    return _spans(model.samples) and max(s.batch_size for s in model.samples) >= largest


def native_engine_args(spec: GenerationSpec, max_num_seqs: int) -> dict[str, Any]:
    """``GenerationEngine`` arguments for the spec's execution: under native, vLLM's own
    drafter with a Dynamic SD lookup (k = maxDraftTokens everywhere, until
    :func:`native_strategy` rewrites it); nothing otherwise."""
    if not spec.speculative.native_execution:
        return {}
    return {
        "native": True,
        "per_batch_size": [(1, max_num_seqs, spec.speculative.max_draft_tokens)],
    }


def native_strategy(
    engine: GenerationEngine,
    spec: GenerationSpec,
    *,
    max_batch: int,
    budget_seconds: float = NATIVE_CALIBRATION_SECONDS,
    cache_dir: Path | None = None,
    write_back: bool = True,
) -> AdaptiveStrategy:
    """The cached native table if one covers this engine, else (if the spec says so)
    calibrate and cache it; build the selector of the engine's one drafter with a learning
    table (written back to the cache as the job runs when calibration is on and
    ``write_back``; a benchmark keeps its runs from teaching the next one), and attach its
    :class:`NativeSchedule` to the engine."""
    speculative = spec.speculative
    if not speculative.native_execution or not engine.native:
        raise ValueError("native_strategy needs selector.execution: native and a native engine")
    drafter = speculative.drafters[0].method.value
    key = native_table_key(engine, drafter)
    path = cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key)
    cached = cached_cost_model(engine, cache_dir, key)
    if cached is not None and (cached.key != key or not _covers(cached, engine, max_batch)):
        cached = None
    save: Callable[[CostModel], None] | None = None
    if cached is not None:
        logger.info("native cost table from cache: %s", path)
        cost_model = cached
    elif speculative.selector.calibrate:
        samples = calibrate_native(engine, max_batch=max_batch, budget_seconds=budget_seconds)
        cost_model = native_cost_model(samples, engine, drafter)
        if _spans(samples):
            store_cost_model(cost_model, path)
            logger.info("native cost table stored: %s (%d probes)", path, len(samples))
    else:
        cost_model = native_cost_model([], engine, drafter)
    if speculative.selector.calibrate and write_back:
        save = lambda model: store_cost_model(model, path)  # noqa: E731
    strategy = adaptive_strategy_for(
        [drafter], engine.max_k, speculative, cost_model, learner=CostLearner(cost_model, save)
    )
    engine.set_native_schedule(NativeSchedule(strategy, drafter))
    return strategy
