"""Multi-step arithmetic word problems with integer answers: an offline task to learn on.

Where it sits: ``rlhfspec data make arithmetic`` (:mod:`rlhfspec_workers.data.cli`) writes
these rows as JSON lines; an RLHFJob's dataset and its held-out eval split read them, and the
``math_answer`` rule scores a response against the row's answer. ``rlhfspec bench learning``
and its CI test train SmolLM2-135M-Instruct on them.

A problem is drawn as numbers first (:class:`Problem`: a start value and 1-4 operations
``+ - * /`` on the running value, every intermediate a positive integer, division exact),
then told in words by one theme of :mod:`rlhfspec_workers.data.arithmetic_wording` (varied
names, nouns, sentences, connectives and instructions), so a policy cannot learn one template.
The number of operations is long-tailed (most problems take 1-2), and so are the worked
solutions. Rows are chat-format, with GSM8K's answer convention (the final number after
``####``)::

    {"id": "arith-train-0-00000",
     "prompt": [{"role": "user", "content": "Ava has 12 marbles. ... after \\"####\\"."}],
     "answer": "12 + 5 = 17\\n17 - 3 = 14\\n#### 14", "ops": 2}

Train and eval rows never share a problem: a problem's split is fixed by a hash of its
numbers (one in :data:`EVAL_BUCKETS` goes to eval), so either split can be regenerated at any
size without touching the other. Deterministic for a seed (``random.Random`` seeded by text).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhfspec_workers.data.arithmetic_wording import (
    CONNECTIVES,
    FRACTIONS,
    INSTRUCTIONS,
    NAMES,
    THEMES,
    connect,
)

Split = Literal["train", "eval"]
OPS = ("+", "-", "*", "/")
EVAL_BUCKETS = 8
"""One problem in this many (by the hash of its numbers) belongs to the eval split."""
MAX_DRAWS = 2_000
"""Draws tried for one row before giving up (the split ran out of distinct problems)."""


@dataclass(frozen=True)
class Step:
    op: str
    operand: int


def apply(value: int, step: Step) -> int:
    """``value op operand``; division must be exact."""
    if step.op == "+":
        return value + step.operand
    if step.op == "-":
        return value - step.operand
    if step.op == "*":
        return value * step.operand
    if step.op == "/":
        if value % step.operand:
            raise ValueError(f"{value} / {step.operand} is not an integer")
        return value // step.operand
    raise ValueError(f"unknown operation {step.op!r}")


@dataclass(frozen=True)
class Problem:
    """The numbers of a problem: apply ``steps`` in order to ``start``."""

    start: int
    steps: tuple[Step, ...]

    @property
    def values(self) -> tuple[int, ...]:
        """The running value: start, then after each step."""
        values = [self.start]
        for step in self.steps:
            values.append(apply(values[-1], step))
        return tuple(values)

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def key(self) -> str:
        """The problem as one expression, e.g. ``12+5-3`` (two rows with one key share it)."""
        return str(self.start) + "".join(f"{s.op}{s.operand}" for s in self.steps)

    def solution(self) -> str:
        """A short worked solution, one line per operation, then ``#### answer``."""
        values = self.values
        lines = [
            f"{values[i]} {step.op} {step.operand} = {values[i + 1]}"
            for i, step in enumerate(self.steps)
        ]
        return "\n".join([*lines, f"#### {self.answer}"])


@dataclass(frozen=True)
class Difficulty:
    """How problems are drawn: operation counts, operations and number ranges."""

    op_count_weights: tuple[float, ...] = (0.6, 0.25, 0.1, 0.05)
    """Weight of 1, 2, 3, 4... operations (long-tailed: most problems take 1-2)."""
    op_weights: tuple[float, ...] = (0.45, 0.35, 0.12, 0.08)
    """Weights of + - * / where each is possible."""
    start: tuple[int, int] = (2, 12)
    addend: tuple[int, int] = (2, 6)
    """Range of the operand of + and -."""
    factor: tuple[int, int] = (2, 3)
    """Range of the operand of * and / (at most 6: division is worded as a fraction too)."""
    max_value: int = 36
    """No running value exceeds this."""


LEVELS: dict[str, Difficulty] = {
    # Sized for a ~135M chat model: SmolLM2-135M-Instruct answers about 1 in 5 greedily
    # (most 1-operation problems it gets, longer ones rarely), so there is room both ways.
    "small": Difficulty(),
    # Bigger numbers and longer chains, for models that find "small" easy.
    "large": Difficulty(
        op_count_weights=(0.45, 0.33, 0.14, 0.08),
        op_weights=(0.35, 0.3, 0.2, 0.15),
        start=(2, 40),
        addend=(2, 20),
        factor=(2, 5),
        max_value=200,
    ),
}
DEFAULT_DIFFICULTY = LEVELS["small"]


def _possible(value: int, d: Difficulty) -> dict[str, list[int]]:
    """The operands each operation may take from ``value`` (positive results, exact division,
    at most ``max_value``)."""
    lo, hi = d.addend
    flo, fhi = d.factor
    return {
        "+": list(range(lo, min(hi, d.max_value - value) + 1)),
        "-": list(range(lo, min(hi, value - 1) + 1)),
        "*": [f for f in range(flo, fhi + 1) if value * f <= d.max_value],
        "/": [f for f in range(flo, fhi + 1) if value % f == 0],
    }


def draw_problem(rng: random.Random, n_ops: int, difficulty: Difficulty) -> Problem:
    """A problem with exactly ``n_ops`` operations (+ or - is always possible)."""
    start = value = rng.randint(*difficulty.start)
    steps: list[Step] = []
    for _ in range(n_ops):
        operands = _possible(value, difficulty)
        ops = [op for op in OPS if operands[op]]
        weights = [difficulty.op_weights[OPS.index(op)] for op in ops]
        op = rng.choices(ops, weights)[0]
        step = Step(op, rng.choice(operands[op]))
        steps.append(step)
        value = apply(value, step)
    return Problem(start, tuple(steps))


def split_of(problem: Problem) -> Split:
    """The split a problem belongs to, fixed by a hash of its numbers."""
    digest = hashlib.blake2b(problem.key.encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") % EVAL_BUCKETS == 0 else "train"


@dataclass(frozen=True)
class Example:
    """One problem told in words; ``templates`` names the templates used (theme:kind:index)."""

    problem: Problem
    text: str
    templates: tuple[str, ...]

    @property
    def theme(self) -> str:
        return self.templates[0].split(":", 1)[0]

    def row(self, row_id: str) -> dict[str, Any]:
        return {
            "id": row_id,
            "prompt": [{"role": "user", "content": self.text}],
            "answer": self.problem.solution(),
            "ops": len(self.problem.steps),
        }


def render(problem: Problem, rng: random.Random) -> Example:
    """Tell ``problem`` in words: a theme, a noun, two names, one sentence per part."""
    theme = rng.choice(THEMES)
    noun = rng.choice(theme.nouns)
    name, friend = rng.sample(NAMES, 2)
    fill: dict[str, Any] = {"name": name, "friend": friend, "items": noun}
    fill.update({slot: rng.choice(choices) for slot, choices in theme.slots.items()})
    kinds = theme.kinds()
    used: list[str] = []

    def pick(kind: str) -> str:
        index = rng.randrange(len(kinds[kind]))
        used.append(f"{theme.name}:{kind}:{index}")
        return kinds[kind][index]

    def say(template: str, n: int, k: int | None) -> str:
        values = dict(fill, n=n, N=theme.count(noun, n))
        if k is not None:
            values.update(k=k, K=theme.count(noun, k), frac=FRACTIONS.get(k, ""))
        return template.format(**values)

    steps = list(problem.steps)
    if steps and steps[0].op == "*" and kinds["grouped"] and rng.random() < 0.5:
        sentences = [say(pick("grouped"), problem.start, steps.pop(0).operand)]
    else:
        sentences = [say(pick("start"), problem.start, None)]
    for step in steps:
        # "After that" needs something before it: the first step is at most "Then ...".
        connective = rng.choice(CONNECTIVES if len(sentences) > 1 else CONNECTIVES[:2])
        template = connect(connective, pick(step.op))
        sentences.append(say(template, problem.start, step.operand))
    sentences.append(say(pick("question"), problem.start, None))
    instruction = rng.choice(INSTRUCTIONS)
    return Example(problem, " ".join(sentences) + "\n" + instruction, tuple(used))


def make_examples(
    n: int, seed: int = 0, split: Split = "train", difficulty: Difficulty = DEFAULT_DIFFICULTY
) -> list[Example]:
    """``n`` examples of ``split``; the same arguments give the same list. Within a split the
    same numbers may come back in another theme, never in the same one."""
    rng = random.Random(f"rlhfspec-arithmetic/{split}/{seed}")
    counts = range(1, len(difficulty.op_count_weights) + 1)
    seen: set[tuple[str, str]] = set()
    examples: list[Example] = []
    while len(examples) < n:
        n_ops = rng.choices(counts, difficulty.op_count_weights)[0]
        for _ in range(MAX_DRAWS):
            problem = draw_problem(rng, n_ops, difficulty)
            if split_of(problem) != split:
                continue
            example = render(problem, rng)
            told = (problem.key, example.theme)
            if told not in seen:
                break
        else:
            raise ValueError(
                f"found only {len(examples)} distinct {split} problems with {n_ops} "
                f"operation(s) in this difficulty; ask for fewer rows or widen the ranges"
            )
        seen.add(told)
        examples.append(example)
    return examples


def make_rows(
    n: int, seed: int = 0, split: Split = "train", difficulty: Difficulty = DEFAULT_DIFFICULTY
) -> list[dict[str, Any]]:
    """Dataset rows (see the module docstring) with ids ``arith-<split>-<seed>-<index>``."""
    return [
        example.row(f"arith-{split}-{seed}-{i:05d}")
        for i, example in enumerate(make_examples(n, seed, split, difficulty))
    ]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` as JSON lines (parent folders created); returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
