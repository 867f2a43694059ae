"""The one reader of a job's prompt rows: JSON lines or Parquet, string or chat prompts.

Where it sits: preflight (``preflight.check_dataset``) reads every row through
:func:`read_rows` before any process starts, so a bad row is reported by file and line; the
coordinator (``coordinator.loop``) reads the same rows again to publish tasks, and
``rlhfspec generate`` reads its ``--prompts`` file with it. One reader means one set of rules:

- the prompt field holds a string, or a non-empty list of ``{role, content}`` messages
  (roles system, user, assistant, tool; content a string) that the policy tokenizer's chat
  template renders;
- ``promptField`` and ``answerField`` may name nested keys with dots (``question.text``);
- an answer may be a string or a number (read as its text);
- the row's other top-level fields travel with each sample as metadata (function rewards
  get them, as TRL passes extra dataset columns).

:func:`split_eval` holds out a seeded share of the rows (``dataset.evalFraction``).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfspec_workers.messages import ChatMessage

ROLES = ("system", "user", "assistant", "tool")
MAX_PROBLEMS = 20
"""Problems reported per file before reading stops (the first ones locate the cause)."""


@dataclass(frozen=True)
class DatasetRow:
    index: int
    """Position among the file's rows (0-based): the prompt's group key across iterations."""
    prompt: str
    """The prompt text; a chat prompt's last user turn."""
    answer: str | None
    messages: tuple[ChatMessage, ...] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    where: str = ""
    """``file:line`` (JSON lines) or ``file: row N`` (Parquet), for messages."""


@dataclass(frozen=True)
class RowProblem:
    field: str
    """The spec field the problem is about, e.g. ``spec.dataset.promptField``."""
    message: str
    allowed: str


class DatasetError(ValueError):
    """Rows the job cannot use; ``problems`` lists each, located by file and line."""

    def __init__(self, problems: Sequence[RowProblem]) -> None:
        super().__init__("\n".join(f"{p.field}: {p.message} ({p.allowed})" for p in problems))
        self.problems = list(problems)


def lookup(record: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """``record["a"]["b"]`` for ``"a.b"`` (a key that itself holds a dot is tried whole
    first); (False, None) when a level is missing."""
    if dotted in record:
        return True, record[dotted]
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _records(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(where, record, problem) per row; a row that does not parse has a problem instead."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow is in the workers extra
            yield f"{path}", None, "reading Parquet needs pyarrow (pip install pyarrow)"
            return
        try:
            table = pq.read_table(path)
        except Exception as exc:
            yield f"{path}", None, f"not a Parquet file ({exc})"
            return
        for number, record in enumerate(table.to_pylist(), start=1):
            yield f"{path}: row {number}", record, None
        return
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line), None
            except ValueError as exc:
                yield where, None, f"not JSON ({exc}); one JSON object per line"


def _messages(value: list[Any], where: str, name: str) -> tuple[ChatMessage, ...] | str:
    """The chat turns of a prompt field, or what is wrong with them."""
    if not value:
        return f"{where}: {name} is an empty list of messages"
    turns: list[ChatMessage] = []
    for i, turn in enumerate(value):
        at = f"{where}: {name}[{i}]"
        if not isinstance(turn, Mapping):
            return f"{at} is {type(turn).__name__}, not a {{role, content}} object"
        role, content = turn.get("role"), turn.get("content")
        if role is None:
            return f"{at} has no role"
        if role not in ROLES:
            return f"{at} has role {role!r}; allowed roles: {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"{at} content is {type(content).__name__}, not a string"
        turns.append(ChatMessage(role=role, content=content))
    return tuple(turns)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def read_rows(
    path: Path,
    prompt_field: str,
    answer_field: str | None,
    *,
    require_answer: bool = False,
    path_field: str = "spec.dataset.path",
) -> list[DatasetRow]:
    """Every row of ``path``; raises :class:`DatasetError` naming each bad row (the first
    :data:`MAX_PROBLEMS`) and the field it breaks. ``require_answer``: a row without the
    answer field is an error (rewards that compare with it)."""
    prompt_spec, answer_spec = "spec.dataset.promptField", "spec.dataset.answerField"
    rows: list[DatasetRow] = []
    problems: list[RowProblem] = []
    for where, record, problem in _records(path):
        if len(problems) >= MAX_PROBLEMS:
            break
        if problem is not None:
            problems.append(RowProblem(path_field, f"{where}: {problem}", "rows"))
            continue
        if not isinstance(record, Mapping):
            problems.append(
                RowProblem(path_field, f"{where}: row is not an object", "one JSON object per row")
            )
            continue
        found, value = lookup(record, prompt_field)
        messages: tuple[ChatMessage, ...] | None = None
        if not found:
            problems.append(
                RowProblem(
                    prompt_spec,
                    f"{where}: row has no field {prompt_field!r}",
                    "every row has it (dots name nested keys), or change promptField",
                )
            )
            continue
        if isinstance(value, list):
            parsed = _messages(value, where, prompt_field)
            if isinstance(parsed, str):
                problems.append(
                    RowProblem(prompt_spec, parsed, "a list of {role, content} messages")
                )
                continue
            messages = parsed
            users = [m.content for m in messages if m.role == "user"]
            text = users[-1] if users else messages[-1].content
        elif isinstance(value, str):
            text = value
        else:
            problems.append(
                RowProblem(
                    prompt_spec,
                    f"{where}: {prompt_field} is {type(value).__name__}",
                    "a string or a list of {role, content} messages",
                )
            )
            continue
        answer: str | None = None
        if answer_field is not None:
            has_answer, raw = lookup(record, answer_field)
            if has_answer and isinstance(raw, str | int | float) and not isinstance(raw, bool):
                answer = str(raw)
            elif require_answer:
                what = "has no field" if not has_answer or raw is None else "has a non-text"
                problems.append(
                    RowProblem(
                        answer_spec,
                        f"{where}: row {what} {answer_field!r}",
                        "a string or number in every row (the reward compares with it)",
                    )
                )
                continue
        top = {prompt_field.split(".")[0], (answer_field or "").split(".")[0]}
        metadata = {k: _jsonable(v) for k, v in record.items() if k not in top}
        rows.append(DatasetRow(len(rows), text, answer, messages, metadata, where))
    if problems:
        raise DatasetError(problems)
    if not rows:
        raise DatasetError([RowProblem(path_field, f"{path} has no rows", "a non-empty dataset")])
    return rows


def split_eval(
    rows: Sequence[DatasetRow], fraction: float, seed: int
) -> tuple[list[DatasetRow], list[DatasetRow]]:
    """(train, held out): a seeded ``fraction`` of the rows (at least one) is held out; the
    draw depends on the seed and row count only, so every process gets the same split."""
    held = max(1, round(fraction * len(rows)))
    if held >= len(rows):
        raise DatasetError(
            [
                RowProblem(
                    "spec.dataset.evalFraction",
                    f"{fraction} of {len(rows)} rows holds out {held}, leaving no training rows",
                    f"a fraction below {(len(rows) - 1) / len(rows):.3f}, or more rows",
                )
            ]
        )
    order = list(range(len(rows)))
    random.Random(f"{seed}:eval-split").shuffle(order)
    chosen = set(order[:held])
    return (
        [r for r in rows if r.index not in chosen],
        [r for r in rows if r.index in chosen],
    )


@dataclass(frozen=True)
class Splits:
    train: list[DatasetRow]
    eval: list[DatasetRow]


def load_splits(
    path: Path,
    eval_path: Path | None,
    *,
    prompt_field: str,
    answer_field: str | None,
    eval_fraction: float | None,
    require_answer: bool,
    seed: int,
) -> Splits:
    """The training rows and the held-out rows a job's dataset spec names."""
    rows = read_rows(path, prompt_field, answer_field, require_answer=require_answer)
    if eval_path is not None:
        held = read_rows(
            eval_path,
            prompt_field,
            answer_field,
            require_answer=require_answer,
            path_field="spec.dataset.eval",
        )
        return Splits(rows, held)
    if eval_fraction is not None and not math.isnan(eval_fraction):
        train, held = split_eval(rows, eval_fraction, seed)
        return Splits(train, held)
    return Splits(rows, [])
