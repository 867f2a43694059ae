"""The policy's own rollouts over a dataset's prompts: what the draft learns from.

Where it sits: step 2 of ``distill``. Prompts come from the dataset file as a job reads it
(``data.rows``); chat rows (a list of messages) and ``chat=True`` go through the tokenizer's
chat template with the assistant header added, plain rows are tokenized as text. Sampling is
at temperature 1 (top-p 1, no top-k), as on-policy RL samples, by vLLM: the engine a job's
generation workers run, so the draft learns the distribution (dtype included) it will draft
for. vLLM decodes ~70x faster than transformers' ``generate`` here (SmolLM2-135M on 2 cores:
~450 response tokens/s at 64 sequences against ~6/s), which makes sampling a small part of
the recipe instead of most of it.
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfspec_workers import vllm_fixes
from rlhfspec_workers.chat import render
from rlhfspec_workers.data.rows import read_rows

KV_CACHE_BYTES = 512 << 20  # SmolLM2-135M: ~22k bf16 tokens, 64 sequences of 340


@dataclass(frozen=True)
class DraftExample:
    """One prompt and the policy's response to it (token ids)."""

    prompt_ids: list[int]
    response_ids: list[int]


def prompt_token_ids(
    tokenizer: Any, dataset: Path, prompt_field: str = "prompt", chat: bool | None = None
) -> list[list[int]]:
    """Every row's prompt as token ids; ``chat`` None: template only for message rows."""
    rows = read_rows(dataset, prompt_field, None)
    out = []
    for row in rows:
        use_chat = row.messages is not None if chat is None else chat
        if use_chat and getattr(tokenizer, "chat_template", None):
            turns = [{"role": m.role, "content": m.content} for m in row.messages or ()]
            ids = render(tokenizer, turns or [{"role": "user", "content": row.prompt}])
        else:
            ids = tokenizer.encode(row.prompt, add_special_tokens=True)
        if ids:
            out.append([int(t) for t in ids])
    return out


@contextmanager
def policy_sampler(
    policy_dir: Path,
    *,
    max_model_len: int,
    dtype: str = "auto",
    seed: int = 0,
) -> Iterator[Any]:
    """An in-process ``vllm.LLM`` over ``policy_dir`` (no speculation), released on exit.

    ``dtype`` "auto" is a job's rule (bf16 where the CPU computes it natively, else fp32).
    Torch's thread count (this process's cores) is set before the engine starts, because
    vLLM's CPU worker then turns ``torch.set_num_threads`` into a no-op for the process: the
    distillation that follows runs at this count too. The engine's seed makes a fresh
    sampler's draws reproducible (vLLM's CPU sampler refuses per-request seeds)."""
    from rlhfspec_workers.hardware import available_cores, resolve_engine_dtype
    from rlhfspec_workers.tinymodels.engine import cpu_engine_env

    cpu_engine_env()
    # vLLM's log lines go to stderr: stdout is the tool's JSON report.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    import torch

    torch.set_num_threads(available_cores())
    from vllm import LLM

    args: dict[str, Any] = {
        "model": str(policy_dir),
        "tokenizer": str(policy_dir),
        "dtype": resolve_engine_dtype(dtype),
        "enforce_eager": True,
        "max_model_len": max_model_len,
        "kv_cache_memory_bytes": KV_CACHE_BYTES,
        "seed": seed,
    }
    vllm_fixes.guard_kernel_rebind()
    llm = LLM(**args)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def sample_rollouts(
    llm: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    token_budget: int,
    stop_ids: Sequence[int],
    batch_size: int = 64,
    seed: int = 0,
) -> list[DraftExample]:
    """Sample one response per prompt (temperature 1) until ``token_budget`` response tokens
    exist, ``batch_size`` prompts per ``generate`` call in a seeded shuffled order.

    A response ends at the first stop id (kept: the draft must learn where turns end) or at
    ``max_new_tokens``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    order = list(prompts)
    random.Random(seed).shuffle(order)
    params = SamplingParams(
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_tokens=max_new_tokens,
        stop_token_ids=[int(s) for s in stop_ids],
        # The stop id is a token of the response: the draft learns to propose it.
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        detokenize=False,
    )
    out: list[DraftExample] = []
    total = 0
    for start in range(0, len(order), batch_size):
        if total >= token_budget:
            break
        chunk = order[start : start + batch_size]
        requests = [TokensPrompt(prompt_token_ids=p) for p in chunk]
        results = llm.generate(requests, params, use_tqdm=False)
        for prompt, result in zip(chunk, results, strict=True):
            response = [int(t) for t in result.outputs[0].token_ids]
            if response:
                out.append(DraftExample(prompt, response))
                total += len(response)
    return out
