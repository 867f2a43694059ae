"""The policy's own rollouts over a dataset's prompts: what the draft learns from.

Where it sits: step 2 of ``distill``. Prompts come from the dataset file as a job reads it
(``data.rows``); chat rows (a list of messages) and ``chat=True`` go through the tokenizer's
chat template with the assistant header added, plain rows are tokenized as text. Sampling is
at temperature 1, as on-policy RL samples, with transformers' ``generate`` in batches: an
offline tool with a token budget, where vLLM's start-up would cost more than it saves.
Decoding keeps a KV cache (``use_cache=True``), whatever the loaded model's config says.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfspec_workers.chat import render
from rlhfspec_workers.data.rows import read_rows


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


@torch.no_grad()
def sample_rollouts(
    policy: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    token_budget: int,
    pad_id: int,
    stop_ids: Sequence[int],
    batch_size: int = 16,
    seed: int = 0,
) -> list[DraftExample]:
    """Sample responses (temperature 1) until ``token_budget`` response tokens exist.

    Prompts are taken in a seeded shuffled order, left-padded per batch; a response ends at
    the first stop id (kept: the draft must learn where turns end) or ``max_new_tokens``."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    torch.manual_seed(seed)
    out: list[DraftExample] = []
    total = 0
    stops = set(int(s) for s in stop_ids)
    for start in range(0, len(order), batch_size):
        if total >= token_budget:
            break
        chunk = order[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        generated = policy.generate(
            input_ids=ids,
            attention_mask=attention,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=list(stops) or None,
            # load_causal_lm turns the model config's cache off (its other passes are full
            # forwards); decoding without one would re-run the whole sequence per token.
            use_cache=True,
        )[:, width:]
        for prompt, row in zip(chunk, generated.tolist(), strict=True):
            response: list[int] = []
            for token in row:
                response.append(int(token))
                if token in stops:
                    break
            if response:
                out.append(DraftExample(prompt, response))
                total += len(response)
    return out
