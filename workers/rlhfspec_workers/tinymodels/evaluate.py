"""Evaluation of the tiny-model kit: accuracy, draft agreement, reward-model accuracy.

Where it sits: ``build.py`` calls these on the models as saved (bf16) to fill ``kit.json``, and
``training.py``'s target loop calls :func:`sample_accuracy` as its stopping probe. HF
``generate`` with left padding and a KV cache; prompts are sorted by length so each batch pads
little and needs few decode steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhfspec_workers.tinymodels.task import TaskExample, parse_prompt, score
from rlhfspec_workers.tinymodels.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    decode_ids,
    encode_chars,
)
from rlhfspec_workers.tinymodels.training import pack_sequences, reward_batch, reward_scores

# Marks a non-character token (pad, unk, reserved) inside a completion so it can never score.
_BAD = "\N{REPLACEMENT CHARACTER}"


def completion_text(ids: Sequence[int]) -> str:
    """Text of generated ids up to the first EOS; without an EOS the text cannot score."""
    out: list[str] = []
    for i in ids:
        if i == EOS_ID:
            return "".join(out)
        ch = decode_ids([i])
        out.append(ch if ch else _BAD)
    return "".join(out) + _BAD


@torch.no_grad()
def generate(
    model: Any,
    prompts: Sequence[str],
    greedy: bool,
    seed: int,
    batch_size: int = 128,
) -> list[str]:
    """Completions (text up to EOS) for ``prompts``; temperature 1, no top-k/top-p if sampling.

    ``max_new_tokens`` is the longest answer in the batch plus EOS: any longer completion is
    wrong anyway, so cutting it changes no score and saves decode steps.
    """
    from transformers import GenerationConfig

    gen_config_cls: Any = GenerationConfig  # untyped in transformers' stubs

    torch.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [encode_chars(prompts[i], add_bos=True) for i in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, width - len(r) :] = torch.tensor(r)
            attn[j, width - len(r) :] = 1
        longest = max(len(parse_prompt(prompts[i])) for i in chunk)
        config = gen_config_cls(
            do_sample=not greedy,
            # top_k/top_p left unset: in transformers 5 that means no truncation (top_k=0 is
            # rejected with a warning), i.e. plain temperature-1 sampling.
            temperature=1.0,
            max_new_tokens=longest + 1,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            use_cache=True,
        )
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)
        for j, i in enumerate(chunk):
            results[i] = completion_text(out[j, width:].tolist())
    return [results[i] for i in range(len(prompts))]


def accuracy(examples: Sequence[TaskExample], completions: Sequence[str]) -> float:
    """Mean ``sort_digits`` reward."""
    if not examples:
        return 0.0
    total = sum(score(ex.prompt, c) for ex, c in zip(examples, completions, strict=True))
    return total / len(examples)


def sample_accuracy(model: Any, examples: Sequence[TaskExample], seed: int) -> float:
    """Temperature-1 accuracy (the target's stopping probe)."""
    return accuracy(examples, generate(model, [ex.prompt for ex in examples], False, seed))


@torch.no_grad()
def greedy_agreement(
    target: Any, draft: Any, examples: Sequence[TaskExample], target_greedy: Sequence[str]
) -> float:
    """Fraction of the target's greedy completion tokens (EOS included) where draft's argmax
    equals target's, teacher-forced on the target's own greedy sequences: this is what a
    greedy draft-model speculator's per-token acceptance measures."""
    # Non-character marks (no EOS, odd tokens) are dropped so every row packs cleanly.
    texts = [t.replace(_BAD, "") for t in target_greedy]
    agree = 0
    total = 0
    for start in range(0, len(examples), 128):
        ids, mask = pack_sequences(examples[start : start + 128], texts[start : start + 128])
        label_mask = mask[:, 1:]
        t_arg = target(input_ids=ids).logits[:, :-1].argmax(-1)
        d_arg = draft(input_ids=ids).logits[:, :-1].argmax(-1)
        agree += int((t_arg == d_arg)[label_mask].sum())
        total += int(label_mask.sum())
    return agree / max(1, total)


@torch.no_grad()
def reward_accuracy(
    model: Any, examples: Sequence[TaskExample], completions: Sequence[str]
) -> float:
    """Fraction where ``score > 0`` matches the completion's true correctness."""
    hits = 0
    for start in range(0, len(examples), 128):
        ids, labels = reward_batch(examples[start : start + 128], completions[start : start + 128])
        predicted = reward_scores(model, ids) > 0
        hits += int((predicted == (labels > 0.5)).sum())
    return hits / max(1, len(examples))


@torch.no_grad()
def expected_accuracy(model: Any, examples: Sequence[TaskExample], batch_size: int = 128) -> float:
    """Mean probability that a temperature-1 sample is exactly the right answer then EOS.

    This is the expected sampled accuracy computed exactly by teacher forcing (no sampling
    noise), so two checkpoints can be compared on a fixed prompt set with a small margin."""
    total = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [
            (encode_chars(ex.prompt, add_bos=True), [*encode_chars(ex.answer), EOS_ID])
            for ex in chunk
        ]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        for j, (p, a) in enumerate(rows):
            ids[j, : len(p) + len(a)] = torch.tensor(p + a)
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        for j, (p, a) in enumerate(rows):
            positions = torch.arange(len(p) - 1, len(p) + len(a) - 1)
            answer = torch.tensor(a)
            total += float(logprobs[j, positions, answer].sum().exp())
    return total / max(len(examples), 1)
