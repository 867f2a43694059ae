"""Held-out greedy accuracy of a Hugging Face checkpoint on task rows.

Where it sits: ``rlhfspec bench learning`` (:mod:`.learning`) and the TRL reference
(:mod:`.trl_reference`) score models with :func:`greedy_accuracy`, so every arm of the
learning benchmark is measured by one evaluator: HF transformers ``generate`` (greedy, fp32;
chat prompts through the tokenizer's chat template with the generation prompt, text prompts
as the tokenizer encodes them), a rule of ``rlhfspec_workers.rewards`` (``math_answer`` or
``sort_digits``, as the job's rule reward scores), and a response cut at the token cap
scoring 0.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfspec_workers.rewards import math_answer, sort_digits


def math_answer_scores(
    responses: Sequence[str], answers: Sequence[str | None], truncated: Sequence[bool]
) -> list[float]:
    """The ``math_answer`` rule of each response; a truncated one scores 0."""
    return [
        0.0 if cut else math_answer.score(response, answer)
        for response, answer, cut in zip(responses, answers, truncated, strict=True)
    ]


Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class EvalRow:
    prompt: Prompt
    """Chat messages (rendered with the chat template) or raw text (tokenized with BOS)."""
    answer: str

    @property
    def text(self) -> str:
        """The prompt's text: the string, or the last message's content."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1]["content"]


Scorer = Callable[[EvalRow, str], float]


SCORERS: dict[str, Scorer] = {
    "math_answer": lambda row, response: math_answer.score(response, row.answer),
    "sort_digits": lambda row, response: sort_digits.score(row.text, response),
}


def read_eval_rows(path: Path, limit: int | None = None) -> list[EvalRow]:
    """Rows of ``path`` (``prompt`` a list of chat messages or a string, ``answer``)."""
    rows: list[EvalRow] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        raw = json.loads(line)
        rows.append(EvalRow(raw["prompt"], str(raw["answer"])))
        if limit is not None and len(rows) >= limit:
            break
    return rows


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    scores: list[float]
    responses: list[str]
    truncated: list[bool]
    seconds: float

    @property
    def cut_fraction(self) -> float:
        return sum(self.truncated) / max(len(self.truncated), 1)


def load_policy(model_dir: Path, tokenizer_dir: Path | None = None) -> tuple[Any, Any]:
    """An fp32 causal LM and its tokenizer (``tokenizer_dir``: where the tokenizer is, when
    the model dir has none, as in a trainer checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def prompt_ids(tokenizer: Any, row: EvalRow) -> list[int]:
    """The policy input of ``row``: chat messages through the chat template with the
    generation prompt; raw text as the tokenizer encodes it (BOS included)."""
    if isinstance(row.prompt, str):
        return list(tokenizer(row.prompt)["input_ids"])
    text = tokenizer.apply_chat_template(row.prompt, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def greedy_accuracy(
    model: Any,
    tokenizer: Any,
    rows: Sequence[EvalRow],
    max_new_tokens: int,
    scorer: Scorer = SCORERS["math_answer"],
    batch_size: int = 32,
) -> EvalResult:
    """Greedy responses to ``rows`` scored by ``scorer``; a response that did not end (EOS)
    within ``max_new_tokens`` scores 0."""
    import torch

    started = time.perf_counter()
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id)
    responses: list[str] = []
    truncated: list[bool] = []
    was_training = bool(model.training)
    model.eval()
    for begin in range(0, len(rows), batch_size):
        encoded = [prompt_ids(tokenizer, r) for r in rows[begin : begin + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
        for new in out[:, width:].tolist():
            ended = eos in new
            tokens = new[: new.index(eos)] if ended else new
            responses.append(tokenizer.decode(tokens, skip_special_tokens=True))
            truncated.append(not ended)
    if was_training:
        model.train()
    scores = [
        0.0 if cut else scorer(row, response)
        for row, response, cut in zip(rows, responses, truncated, strict=True)
    ]
    return EvalResult(
        accuracy=sum(scores) / max(len(scores), 1),
        scores=scores,
        responses=responses,
        truncated=truncated,
        seconds=time.perf_counter() - started,
    )
