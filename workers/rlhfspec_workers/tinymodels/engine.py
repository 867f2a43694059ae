"""A vLLM (CPU) engine over the tiny kit: target ``policy/`` with ``draft/`` as draft model.

Where it sits: the shared test engine (``tests/conftest.py::spec_engine``) and local smoke runs
build their ``LLM`` here so the CPU settings that matter live in one place. Importing this
module has no side effects and does not import vLLM (field notes 3: engine-building code must
be safe to import under ``spawn``); everything happens inside :func:`tiny_spec_llm`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_KV_CACHE_BYTES = 128 * 1024 * 1024  # ~26k target+draft tokens: 200 full seqs
SPEC_COUNTERS = (
    "vllm:spec_decode_num_drafts",
    "vllm:spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens",
)


def cpu_engine_env() -> None:
    """Environment defaults for an in-process CPU engine (callers' own settings win).

    In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) starts in seconds instead of ~15 s and
    needs no spawn-safe ``__main__`` guard; the KV cache is sized by ``kv_cache_memory_bytes``,
    so ``VLLM_CPU_KVCACHE_SPACE`` (which overrides it in whole GiB) is left unset.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _expand_kernel_fixed(
    output: Any,
    input_val: Any,
    cu_num_tokens: Any,
    replace_from: Any,
    replace_to: Any,
    MAX_NUM_TOKENS: Any = None,  # the Triton kernel's parameter name
) -> None:
    """Pure-torch ``expand_kernel``: output[start_i:end_i] = input[i] (replace_from -> to)."""
    import torch

    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = input_val.clone()
    values[input_val == replace_from] = replace_to
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.shape[0]].copy_(expanded.to(output.dtype))


def expand_kernel_is_broken() -> bool:
    """True when vLLM's CPU ``expand_batch_to_tokens`` returns garbage (vllm-cpu 0.32.0).

    Its C++ fallback for the Triton ``expand_kernel`` casts the float output buffer to an int64
    copy, writes the copy and drops it, so the per-token temperatures (and top-p/top-k) of the
    rejection sampler are uninitialised memory: with temperature > 0, speculative decoding
    accepts ~15-25% of drafts and emits tokens the target gives ~1e-5 probability (seen here:
    temperature-1 accuracy 0.23-0.30 vs 0.62 without speculation). Greedy is unaffected.
    """
    import torch
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    x = torch.tensor([0.25, 1.5], dtype=torch.float32)
    cu = torch.tensor([2, 3], dtype=torch.int32)
    got = expand_batch_to_tokens(x, cu, 3, replace_from=0, replace_to=1)
    return not torch.equal(got, torch.tensor([0.25, 0.25, 1.5]))


def fix_vllm_cpu_expand_kernel() -> bool:
    """Replace the broken kernel in this process; returns True when a fix was applied.

    Only reaches engines running in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and
    must run *after* the engine is built: each worker init re-registers vLLM's own overrides.
    """
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON or not expand_kernel_is_broken():
        return False
    from vllm.triton_utils.dispatcher import register_kernels

    register_kernels({"vllm.v1.sample.rejection_sampler.expand_kernel": _expand_kernel_fixed})
    if expand_kernel_is_broken():
        raise RuntimeError("could not repair vLLM's CPU expand kernel")
    return True


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
    the stable choice on a shared 2-core machine (field notes 7). ``num_speculative_tokens=0``
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
    llm = LLM(**kwargs)
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        # Sampling (temperature > 0) with speculation is wrong without this; see
        # expand_kernel_is_broken. A multiprocess engine cannot be fixed from here.
        fix_vllm_cpu_expand_kernel()
    return llm


def spec_counters(llm: Any) -> dict[str, float]:
    """Cumulative speculative-decoding counters of ``llm`` (take deltas around a workload)."""
    values = dict.fromkeys(SPEC_COUNTERS, 0.0)
    for metric in llm.get_metrics():
        if metric.name in values:
            values[metric.name] += float(getattr(metric, "value", 0.0))
    return values
