"""Cost tables: measure the engine's step costs per model and hardware, cache, reload, refine.

Where it sits: ``adaptive.make_strategy`` calls :func:`calibrated_cost_model` at worker start
(``SelectorSpec.calibrate``), before the first rollout. It reloads the JSON table stored under
``CostTableKey`` (model + hardware) when one covers this engine (its drafters, batch sizes and
k; the cache: ``cost_cache``), else runs ``calibrate.py``'s probes on the running engine
within a time budget (``calibration_run.calibrate_engine``, :data:`CALIBRATION_BUDGET_SECONDS`)
and builds ``spec_decode.CostModel``; what the budget did not reach is fitted and marked in the
table's plan, so a later worker continues measuring it instead of starting over. While the job
runs, ``cost_learner.CostLearner`` feeds real steps into the table and writes it back to the cache
(``cost_cache.store_cost_model``). The table's entries are whole engine steps: the selector
compares complete steps of each strategy, the proposer's own bookkeeping included.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import CostTableKey, DrafterCost
from rlhfspec_workers.spec_decode.synthetic_cost import Roofline, synthetic_cost_model

from .calibration_run import (
    CALIBRATION_BUDGET_SECONDS,
    CalibrationReport,
    calibrate_engine,
    calibration_max_batch,
)
from .cost_cache import cache_file, cost_table_key, default_cache_dir, store_cost_model

if TYPE_CHECKING:  # the engine imports vLLM; loading a cached table must not need it
    from .engine import GenerationEngine

logger = logging.getLogger(__name__)

Log = Callable[[str], None]


def covers(model: CostModel, drafters: Iterable[str], max_batch: int, max_k: int) -> bool:
    """Whether a cached table was planned for everything this engine may choose (its cells
    measured or, in a partial table, fitted: see ``CostModel.missing``)."""
    batches = max((b for b, _ in model.plan), default=0)
    tokens = max((t for _, t in model.plan), default=0)
    return set(drafters) <= set(model.drafters) and batches >= max_batch and tokens > max_k


def _needs_measuring(model: CostModel, drafters: Iterable[str], max_batch: int, max_k: int) -> bool:
    """Whether a cached table still has cells (or drafter batch sizes) this engine would use
    that were neither measured nor learned online."""
    if any(b <= max_batch and t <= max_k + 1 for b, t in model.missing()):
        return True
    missing = model.missing_drafter_batches()
    return any(b <= max_batch for name in drafters for b in missing.get(name, ()))


def calibrated_cost_model(
    engine: GenerationEngine,
    cache_dir: Path | None = None,
    key: CostTableKey | None = None,
    *,
    max_batch: int | None = None,
    repeats: int = 1,
    recalibrate: bool = False,
    budget_seconds: float = CALIBRATION_BUDGET_SECONDS,
    log: Log | None = None,
) -> CostModel:
    """The engine's cost table: from the cache when one was measured for this model and
    hardware and covers this engine's drafters, batch sizes and k, else measured now within
    ``budget_seconds`` and stored. A cached *partial* table (cells the budget of an earlier
    worker did not reach, not learned online since) is continued: only what is missing is
    measured. ``max_batch`` caps the batch sizes measured (default: the engine's
    max_num_seqs; never more than its KV cache runs at once, :func:`calibration_max_batch`;
    larger ones are extrapolated)."""
    say = log or logger.info
    key = key or cost_table_key(engine)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_file(cache_dir, key)
    max_batch = calibration_max_batch(engine, max_batch)
    start: CostModel | None = None
    if path.is_file() and not recalibrate:
        try:
            cached = CostModel.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError) as err:
            say(f"calibration cache {path} unreadable ({err}); measuring again")
        else:
            if cached.key != key:
                say(f"calibration cache {path} holds another key; measuring again")
            elif not _needs_measuring(cached, engine.drafters, max_batch, engine.max_k) and covers(
                cached, engine.drafters, max_batch, engine.max_k
            ):
                state = " (partial: the rest fitted, refined online)" if cached.partial else ""
                say(f"cost table from cache: {path}{state}")
                return cached
            else:
                say(f"cached cost table {path} is partial or does not cover this engine; "
                    "measuring what is missing")  # fmt: skip
                start = cached
    say(
        f"calibrating step costs for {key.slug()} (max batch {max_batch}, k <= {engine.max_k}, "
        f"budget {budget_seconds:.0f}s)"
    )
    report = CalibrationReport()
    model = calibrate_engine(
        engine,
        key=key,
        max_batch=max_batch,
        repeats=repeats,
        budget_seconds=budget_seconds,
        start=start,
        report=report,
    )
    store_cost_model(model, path)
    verify = [m for m in report.measured if m[0] == "verify"]
    say(
        f"cost table stored: {path} ({len(verify)} cells, "
        f"{len(report.measured) - len(verify)} drafter points measured in {report.seconds:.1f}s"
        + (f"; {len(report.skipped)} probes left for later, fitted" if report.skipped else "")
        + ")"
    )
    return model


def uncalibrated_cost_model(drafters: Iterable[str], max_k: int) -> CostModel:
    """When calibration is switched off and nothing is cached: a generic memory-then-compute
    roofline with free drafters. Rough; it still shrinks k as the batch grows."""
    return synthetic_cost_model(
        Roofline(), drafters=[DrafterCost(d) for d in drafters], max_batch=256, max_k=max_k
    )


def describe(model: CostModel, batches: Sequence[int], ks: Sequence[int]) -> dict[str, Any]:
    """A cost table as plain numbers (milliseconds) for logs and benchmark JSON."""
    out: dict[str, Any] = {"key": json.loads(model.to_json())["key"], "verify_ms": {}}
    for b in batches:
        out["verify_ms"][str(b)] = {str(k): round(model.verify_seconds(b, k) * 1e3, 3) for k in ks}
    out["draft_ms"] = {
        d: {str(b): round(model.draft_seconds(d, b, 1) * 1e3, 3) for b in batches}
        for d in model.drafters
    }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Time a calibration on a model directory: ``python -m
    rlhfspec_workers.generation.cost_table MODEL_DIR`` (adaptive mode with the suffix and
    ngram drafters, fp32 on CPU, 256 slots, a fresh cache unless ``--cache`` is given)."""
    import argparse
    import tempfile

    from rlhfspec_api.generation import GenerationSpec

    from .engine import GenerationEngine

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--budget", type=float, default=CALIBRATION_BUDGET_SECONDS)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--max-k", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = GenerationSpec.model_validate(
        {"speculative": {"mode": "adaptive", "maxDraftTokens": args.max_k}}
    )
    started = time.monotonic()
    engine = GenerationEngine(
        spec, args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_model_len=1024
    )
    built = time.monotonic() - started
    try:
        with tempfile.TemporaryDirectory() as fresh:
            cache = args.cache or Path(fresh)
            started = time.monotonic()
            model = calibrated_cost_model(
                engine, cache, max_batch=args.max_batch, budget_seconds=args.budget, log=print
            )
            seconds = time.monotonic() - started
            print(f"engine built in {built:.1f}s; calibrated_cost_model took {seconds:.1f}s")
            print(f"{model!r}: {len(model.samples)} cells measured, missing {model.missing()}")
            batches = sorted({b for b, _ in model.plan})
            print(json.dumps(describe(model, batches, [0, 1, 2, 4, args.max_k]), indent=1))
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
