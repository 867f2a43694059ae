"""Cost tables: measure the engine's step costs once per model and hardware, cache, reload.

Where it sits: ``adaptive.make_policy`` calls :func:`calibrated_cost_model` at worker start
(``SelectorSpec.calibrate``). It reloads the JSON table stored under ``CostTableKey`` (model +
hardware) when one covers this engine (its drafters, batch sizes and k), else runs
``calibrate.py``'s measurements on the running engine (under a minute on the tiny models) and
fits ``spec_decode.CostModel``. The table's entries are whole engine steps: the selector
compares complete steps of each strategy, the proposer's own bookkeeping included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfspec_workers.drafters.base import DraftRow
from rlhfspec_workers.drafters.off import OffDrafter
from rlhfspec_workers.spec_decode.cost_model import (
    CostModel,
    CostSample,
    CostTableKey,
    DrafterCost,
    Roofline,
    calibration_plan,
    synthetic_cost_model,
)

if TYPE_CHECKING:  # the engine imports vLLM; loading a cached table must not need it
    from .engine import GenerationEngine

logger = logging.getLogger(__name__)

FILL = "fill"
"""calibrate.py's probe drafter name (it installs its own unless one is registered)."""
IDLE = "idle"
"""Calibration-only drafter name: the proposer runs its per-step bookkeeping, drafts nothing."""

Log = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$RLHFSPEC_CACHE/calibration`` (default ``~/.cache/rlhfspec/calibration``)."""
    base = os.environ.get("RLHFSPEC_CACHE") or str(Path.home() / ".cache" / "rlhfspec")
    return Path(base).expanduser() / "calibration"


def hardware_id(device: str) -> str:
    """What step costs depend on besides the model: the accelerator, or the CPU and threads."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"cuda:{name}:x{torch.cuda.device_count()}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return f"cpu:{cpu}:{capability}:t{torch.get_num_threads()}"


def model_id(engine: GenerationEngine) -> str:
    """The policy model (its config and weight sizes), dtype and drafters: what the table
    measured. Weight *values* do not change step costs, so a weight sync keeps the table."""
    cfg = engine.engine.model_config
    path = Path(str(cfg.model))
    digest = hashlib.sha256()
    config_file = path / "config.json"
    if config_file.is_file():
        digest.update(config_file.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    digest.update(str(cfg.dtype).encode())
    for spec in engine.spec.speculative.drafters:
        digest.update(f"{spec.method.value}:{spec.model.path if spec.model else ''}".encode())
    for name in sorted(engine.drafters):
        draft = getattr(engine.drafters[name], "model", None)
        shape = [getattr(draft, a, None) for a in ("hidden", "num_layers", "vocab_size")]
        digest.update(f"{name}:{shape}".encode())
    return f"{path.name}:{digest.hexdigest()[:16]}"


def cost_table_key(engine: GenerationEngine) -> CostTableKey:
    return CostTableKey(model_id(engine), hardware_id(engine.device))


def _cache_file(cache_dir: Path, key: CostTableKey) -> Path:
    full = f"{key.model_id}@{key.hardware_id}"
    return cache_dir / f"{key.slug()[:80]}-{hashlib.sha256(full.encode()).hexdigest()[:12]}.json"


def _max_num_seqs(engine: GenerationEngine) -> int:
    return int(engine.engine.vllm_config.scheduler_config.max_num_seqs)


def covers(model: CostModel, drafters: Iterable[str], max_batch: int, max_k: int) -> bool:
    """Whether a cached table was measured for everything this engine may choose."""
    batches = max((s.batch_size for s in model.samples), default=0)
    tokens = max((s.tokens_per_seq for s in model.samples), default=0)
    return set(drafters) <= set(model.drafters) and batches >= max_batch and tokens > max_k


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


def calibrate_engine(
    engine: GenerationEngine,
    *,
    key: CostTableKey | None = None,
    max_batch: int | None = None,
    repeats: int = 1,
    prompt_len: int = 16,
) -> CostModel:
    """Measure and fit the cost model on the running engine (adaptive proposer required).

    Costs are split so that ``step_seconds(d, B, k)`` is a whole engine step: each
    verification sample gets the proposer's own per-step cost at that B (measured drafting
    nothing) added back, and a drafter is charged only what it adds on top of that."""
    from .calibrate import measure_drafter, measure_verify

    proposer = engine.proposer
    if proposer is None:
        raise RuntimeError("calibration needs the adaptive proposer (speculative mode not off)")
    max_k = engine.max_k
    max_batch = max_batch or _max_num_seqs(engine)
    plan = calibration_plan(max_batch, max_k)
    batches = sorted({b for b, _ in plan})
    hf_config = engine.engine.model_config.hf_config
    pad = getattr(hf_config, "pad_token_id", None)
    proposer.drafters[FILL] = RejectedFillDrafter(int(pad) if pad is not None else 0)
    proposer.drafters[IDLE] = OffDrafter()
    try:
        # Enough steps that every row still has a full k-token budget for several of them.
        verify = measure_verify(
            engine, plan, steps=max_k + 6, repeats=repeats, prompt_len=prompt_len
        )
        idle = measure_drafter(engine, IDLE, batches, k=1, steps=6, prompt_len=prompt_len)
        base = dict(idle.per_token)
        draft_k = max(1, max_k // 2)
        drafters: list[DrafterCost] = []
        for name in engine.drafters:
            cost = measure_drafter(engine, name, batches, k=draft_k, steps=6, prompt_len=prompt_len)
            extra = tuple((b, max(0.0, s - base.get(b, 0.0) / draft_k)) for b, s in cost.per_token)
            drafters.append(DrafterCost(name, 0.0, extra))
    finally:
        proposer.drafters.pop(FILL, None)
        proposer.drafters.pop(IDLE, None)
    samples = [
        CostSample(s.batch_size, s.tokens_per_seq, s.seconds + base.get(s.batch_size, 0.0))
        for s in verify
    ]
    return CostModel(key or cost_table_key(engine), samples, drafters)


def cached_cost_model(
    engine: GenerationEngine, cache_dir: Path | None = None, key: CostTableKey | None = None
) -> CostModel | None:
    """The stored table for this engine's model and hardware, if any (no coverage check)."""
    key = key or cost_table_key(engine)
    path = _cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key)
    try:
        return CostModel.from_json(path.read_text()) if path.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


def calibrated_cost_model(
    engine: GenerationEngine,
    cache_dir: Path | None = None,
    key: CostTableKey | None = None,
    *,
    max_batch: int | None = None,
    repeats: int = 1,
    recalibrate: bool = False,
    log: Log | None = None,
) -> CostModel:
    """The engine's cost table: from the cache when one was measured for this model and
    hardware (and covers this engine's drafters, batch sizes and k), else measured now and
    stored (JSON, written atomically so concurrent workers never read half a file)."""
    say = log or logger.info
    key = key or cost_table_key(engine)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cache_file(cache_dir, key)
    max_batch = max_batch or _max_num_seqs(engine)
    if path.is_file() and not recalibrate:
        try:
            model = CostModel.from_json(path.read_text())
        except (ValueError, KeyError, TypeError) as err:
            say(f"calibration cache {path} unreadable ({err}); measuring again")
        else:
            if covers(model, engine.drafters, max_batch, engine.max_k):
                say(f"cost table from cache: {path}")
                return model
            say(f"cached cost table {path} does not cover this engine; measuring again")
    say(f"calibrating step costs for {key.slug()} (max batch {max_batch}, k <= {engine.max_k})")
    model = calibrate_engine(engine, key=key, max_batch=max_batch, repeats=repeats)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(model.to_json())
    tmp.replace(path)
    say(f"cost table stored: {path}")
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
