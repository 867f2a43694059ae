"""A vLLM (CPU) engine over the tiny kit: target ``policy/`` with ``draft/`` as draft model.

Where it sits: the shared test engine (``tests/conftest.py::spec_engine``) and local smoke runs
build their ``LLM`` here so the CPU settings that matter live in one place. Importing this
module has no side effects and does not import vLLM (vLLM may spawn processes that re-import
modules, so engine-building code must be safe to import: docs/cpu-notes.md §2); everything
happens inside :func:`tiny_spec_llm`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhfspec_workers import vllm_counters

DEFAULT_KV_CACHE_BYTES = 128 * 1024 * 1024  # ~26k target+draft tokens: 200 full seqs
SPEC_COUNTERS = tuple(vllm_counters.SCALAR_COUNTERS)


def cpu_engine_env() -> None:
    """Environment defaults for an in-process CPU engine (callers' own settings win).

    In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) starts in seconds instead of ~15 s and
    needs no spawn-safe ``__main__`` guard; the KV cache is sized by ``kv_cache_memory_bytes``,
    so ``VLLM_CPU_KVCACHE_SPACE`` (which overrides it in whole GiB) is left unset.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_spec_llm(
    kit_dir: Path,
    num_speculative_tokens: int = 4,
    threads: int | None = 1,
    kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES,
    seed: int = 0,
    **llm_kwargs: Any,
) -> Any:
    """``vllm.LLM`` serving ``kit_dir/policy`` with ``kit_dir/draft`` as its draft model.

    ``threads`` sets torch's thread count *before* the engine starts: vLLM's CPU worker then
    replaces ``torch.set_num_threads`` with a no-op for the rest of the process. One thread is
    the stable choice on a shared 2-core machine (docs/cpu-notes.md §1).
    ``num_speculative_tokens=0``
    builds a plain engine without a draft.
    """
    cpu_engine_env()
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": str(kit_dir / "policy"),
        "tokenizer": str(kit_dir / "policy"),
        "dtype": "bfloat16",
        "enforce_eager": True,
        "max_model_len": 128,
        "kv_cache_memory_bytes": kv_cache_memory_bytes,
        "disable_log_stats": False,
        "seed": seed,
    }
    if num_speculative_tokens > 0:
        kwargs["speculative_config"] = {
            "method": "draft_model",
            "model": str(kit_dir / "draft"),
            "num_speculative_tokens": num_speculative_tokens,
        }
    kwargs.update(llm_kwargs)
    from rlhfspec_workers import vllm_fixes

    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    if in_process:
        vllm_fixes.guard_kernel_rebind()
    llm = LLM(**kwargs)
    if in_process:
        # Sampling (temperature > 0) with speculation is wrong without this; see
        # vllm_fixes. A multiprocess engine cannot be fixed from here.
        vllm_fixes.apply()
    return llm


def spec_counters(llm: Any) -> dict[str, float]:
    """Cumulative speculative-decoding counters of ``llm`` (take deltas around a workload): its
    own engine's, even after another engine started in the process (vllm_counters)."""
    counts = vllm_counters.spec_counters(llm.llm_engine)
    return {name: float(counts[name]) for name in SPEC_COUNTERS}
