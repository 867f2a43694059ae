"""Reward ``function``: a user's Python callable, ``package.module:function``.

Where it sits: preflight calls :func:`import_function` for every function reward before any
process starts (a module that does not import fails there, naming the field); ``registry``
wraps the callable in a :class:`FunctionReward` for the inference worker. The callable is
called once per batch as ``fn(prompts, responses, answers, metadata)``, one list entry per
rollout:

- ``prompts``: the chat messages (``[{"role": ..., "content": ...}, ...]``) when the row's
  prompt was a chat, else the prompt string;
- ``responses``: the generated text;
- ``answers``: the row's answer field (None when the dataset has none);
- ``metadata``: the row's other fields, plus ``sample_id``, ``group_id`` and
  ``finish_reason`` (``"length"``: cut off by maxNewTokens, ``"stop"``: finished).

It returns one finite number per response. Whatever goes wrong (the import, a callable that
raises, a wrong length, NaN) raises :class:`RewardError` naming the field and the function;
a batch is never scored 0 in its place. Modules are found on PYTHONPATH, in the installed
packages and, as with ``python -c``, in the current directory.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rlhfspec_workers.messages import Rollout

from .base import RewardError

NAME = "function"
UserFunction = Callable[..., Any]


def _current_directory_on_path() -> None:
    """Put the current directory first on ``sys.path`` unless it is there (``python -c``
    and ``python -m`` do so; a console script such as ``rlhfspec`` does not)."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def import_function(ref: str, field: str) -> UserFunction:
    """The callable ``ref`` (``package.module:function``) names; RewardError naming ``field``
    when the module does not import, lacks the name, or the name is not callable."""
    module_name, _, attribute = ref.partition(":")
    if not module_name or not attribute:
        raise RewardError(field, f"{ref!r} is not package.module:function")
    _current_directory_on_path()
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise RewardError(
            field, f"cannot import {module_name!r} for {ref}: {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            where = getattr(module, "__file__", None) or module_name
            raise RewardError(field, f"{ref}: module {module_name} ({where}) has no {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RewardError(field, f"{ref} is a {type(target).__name__}, not a callable")
    fn: UserFunction = target
    return fn


def prompt_of(rollout: Rollout) -> str | list[dict[str, str]]:
    """What the function sees as the prompt: the chat messages, else the prompt text."""
    if rollout.messages is not None:
        return [{"role": m.role, "content": m.content} for m in rollout.messages]
    return rollout.prompt


def metadata_of(rollout: Rollout) -> dict[str, Any]:
    """The row's other fields plus the sample's identity and how it finished."""
    return {
        **rollout.metadata,
        "sample_id": rollout.sample_id,
        "group_id": rollout.group_id,
        "finish_reason": rollout.finish_reason,
    }


def check_scores(result: object, rollouts: Sequence[Rollout], ref: str, field: str) -> list[float]:
    """``result`` as one finite float per rollout; RewardError saying what is wrong."""
    if isinstance(result, str | bytes | dict) or not hasattr(result, "__iter__"):
        raise RewardError(
            field, f"{ref} returned {type(result).__name__}, not a list of {len(rollouts)} floats"
        )
    values = list(result)
    if len(values) != len(rollouts):
        raise RewardError(
            field, f"{ref} returned {len(values)} scores for {len(rollouts)} responses"
        )
    scores: list[float] = []
    for index, value in enumerate(values):
        try:
            if value is None or isinstance(value, str | bytes):
                raise TypeError
            number = float(value)  # int, float, bool, numpy and torch scalars
        except (TypeError, ValueError):
            raise RewardError(
                field, f"{ref} returned {value!r} for response {index}, not a number"
            ) from None
        if not math.isfinite(number):
            sample = rollouts[index].sample_id
            raise RewardError(
                field, f"{ref} returned {number} for response {index} (sample {sample})"
            )
        scores.append(number)
    return scores


class FunctionReward:
    """A user's callable as a reward: builds its arguments, checks what it returns."""

    def __init__(self, ref: str, field: str, fn: UserFunction | None = None) -> None:
        self.ref = ref
        self.field = field
        self.fn = fn if fn is not None else import_function(ref, field)

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        if not rollouts:
            return []
        prompts = [prompt_of(r) for r in rollouts]
        responses = [r.text for r in rollouts]
        answers = [r.answer for r in rollouts]
        metadata = [metadata_of(r) for r in rollouts]
        try:
            result = self.fn(prompts, responses, answers, metadata)
        except Exception as exc:
            raise RewardError(self.field, f"{self.ref} raised {type(exc).__name__}: {exc}") from exc
        return check_scores(result, rollouts, self.ref, self.field)
