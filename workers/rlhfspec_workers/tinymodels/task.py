"""The synthetic RL task of the tiny-model kit: sort a list of digits.

Where it sits: the kit (``build.py``) trains the tiny policy, draft and reward model on this task,
writes its prompt sets as the kit's dataset, and the RL loop later scores rollouts with
:func:`score` (the rule reward named ``sort_digits``). Pure python on purpose: the control plane
and the rule-reward path import it without torch.

Format: the prompt is ``S`` + digits + ``=``, e.g. ``S31415926=``; the answer is
the digits sorted, e.g. ``11234569``. The tokenizer adds BOS to prompts and the model ends its
answer with EOS. List lengths are ``3 + floor(Exp(mean 6))`` capped at 40, so answer lengths are
long-tailed (median 7-8 digits, p90 ~16, p99 ~30): the tail is where the policy fails and where
rollouts straggle, which is what sample reallocation is about.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rlhfspec_workers.rewards import sort_digits

TASK_NAME = "sort_digits"
PROMPT_PREFIX = "S"
PROMPT_SUFFIX = "="
DIGITS = "0123456789"
MIN_DIGITS = 3
MEAN_EXTRA_DIGITS = 6.0
MAX_DIGITS = 40


@dataclass(frozen=True)
class TaskExample:
    """One prompt and its reference answer (both plain text, no special tokens)."""

    prompt: str
    answer: str

    def to_json(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer}


def sample_num_digits(rng: random.Random) -> int:
    """List length: 3 + floor(Exp(mean 6)), capped at 40."""
    extra = math.floor(rng.expovariate(1.0 / MEAN_EXTRA_DIGITS))
    return min(MAX_DIGITS, MIN_DIGITS + extra)


def make_prompt(digits: str) -> str:
    """``"31415926"`` -> ``"S31415926="``."""
    if not digits or any(c not in DIGITS for c in digits):
        raise ValueError(f"digits must be a non-empty string of 0-9, got {digits!r}")
    return f"{PROMPT_PREFIX}{digits}{PROMPT_SUFFIX}"


def parse_prompt(prompt: str) -> str:
    """Return the digit list of a prompt; tolerates a leading ``<bos>`` and whitespace."""
    text = prompt.strip().removeprefix("<bos>")
    if not (text.startswith(PROMPT_PREFIX) and text.endswith(PROMPT_SUFFIX)):
        raise ValueError(f"not a sort_digits prompt: {prompt!r}")
    digits = text[len(PROMPT_PREFIX) : -len(PROMPT_SUFFIX)]
    if not digits or any(c not in DIGITS for c in digits):
        raise ValueError(f"not a sort_digits prompt: {prompt!r}")
    return digits


def answer_for(prompt: str) -> str:
    """The reference answer of a prompt: its digits, sorted."""
    return "".join(sorted(parse_prompt(prompt)))


def random_example(rng: random.Random) -> TaskExample:
    """One example drawn from the task distribution using ``rng``."""
    n = sample_num_digits(rng)
    digits = "".join(rng.choice(DIGITS) for _ in range(n))
    return TaskExample(prompt=make_prompt(digits), answer="".join(sorted(digits)))


def make_examples(n: int, seed: int) -> list[TaskExample]:
    """``n`` examples, a pure function of ``seed`` (``random.Random`` is stable across 3.x)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    return [random_example(rng) for _ in range(n)]


def score(prompt: str, completion_text: str) -> float:
    """Rule reward ``sort_digits``: 1.0 when the completion is exactly the sorted digits.

    Surrounding whitespace and trailing literal ``<eos>``/``<pad>`` are ignored so the score does
    not depend on whether the caller detokenised with ``skip_special_tokens``. A malformed prompt
    scores 0.0 rather than raising: a reward function must not crash the rollout loop. The
    scoring itself is the reward's (``rewards.sort_digits``), so the kit and jobs agree.
    """
    return sort_digits.score(prompt, completion_text)


def write_dataset_jsonl(path: Path | str, n: int, seed: int) -> Path:
    """Write ``n`` examples (fields ``prompt``, ``answer``) as JSON lines; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="\n") as fh:
        for example in make_examples(n, seed):
            fh.write(json.dumps(example.to_json(), sort_keys=True) + "\n")
    return out


def read_dataset_jsonl(path: Path | str) -> list[TaskExample]:
    """Read a file written by :func:`write_dataset_jsonl`."""
    examples: list[TaskExample] = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                examples.append(TaskExample(prompt=row["prompt"], answer=row["answer"]))
    return examples


def quantile(values: Iterable[int], q: float) -> float:
    """Nearest-rank quantile (small helper for reports and tests; avoids a numpy import)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return float(ordered[rank])
