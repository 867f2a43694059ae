"""Reward functions of the inference stage: one registry keyed by the job's RewardSpec.

Where it sits: ``inference.experience.ExperienceMaker`` builds one with :func:`build_reward`
and scores each batch of rollouts before computing reference log-probs (and critic values).
Two kinds: a rule (``sort_digits``: :func:`rlhfspec_workers.tinymodels.task.score`;
``final_number``: the response's last number against the answer; both pure python) and a
sequence-classification reward model run on ``prompt + response``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from rlhfspec_api.spec import RewardRule, RewardSpec, RewardType
from rlhfspec_workers.messages import Rollout
from rlhfspec_workers.tinymodels import task
from rlhfspec_workers.torch_models import ValueModel, last_token_scores, load_value_model

REWARD_MODEL_FIELD = "spec.models.reward"


class RewardFunction(Protocol):
    """Scores a batch of rollouts: one float per rollout, in order."""

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]: ...


def _unfinished(rollout: Rollout) -> bool:
    # A response cut off by max_tokens never produced its EOS, so it is not an answer (the task
    # rewards "the exact answer ending in EOS"), even when its digits happen to be right so far.
    return rollout.finish_reason == "length"


class SortDigitsReward:
    """Rule ``sort_digits``: 1.0 for exactly the sorted digits followed by EOS, else 0.0."""

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        return [
            0.0 if _unfinished(r) else task.score(r.prompt, r.text) for r in rollouts
        ]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators dropped), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


class FinalNumberReward:
    """Rule ``final_number``: 1.0 when the response's last number equals the row's answer
    (as numbers: "42", "42.0" and "42." all match 42), else 0.0; chat models usually end a
    worked answer with the result. A response cut off by max_tokens scores 0."""

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        scores: list[float] = []
        for r in rollouts:
            want = final_number(r.answer or "")
            got = None if _unfinished(r) else final_number(r.text)
            scores.append(1.0 if want is not None and got is not None and got == want else 0.0)
        return scores


RULES: dict[RewardRule, Callable[[], RewardFunction]] = {
    RewardRule.SORT_DIGITS: SortDigitsReward,
    RewardRule.FINAL_NUMBER: FinalNumberReward,
}


class ModelReward:
    """A sequence-classification reward model's score of ``prompt + response text``.

    The text is re-tokenised with the reward model's own tokenizer (it need not share the
    policy's), a trailing literal EOS string is dropped (the kit's reward model was trained on
    ``<bos> prompt completion`` without EOS), and the head is read at the last real token.
    """

    def __init__(self, model_dir: Path, device: torch.device, batch_size: int = 64) -> None:
        from transformers import AutoTokenizer

        self.device = device
        self.batch_size = batch_size
        self.model: ValueModel = load_value_model(model_dir, device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else 0
        eos = self.tokenizer.eos_token
        self.eos_text: str | None = str(eos) if eos else None

    def _text(self, rollout: Rollout) -> str:
        text = rollout.text
        if self.eos_text:
            text = text.rstrip().removesuffix(self.eos_text)
        return rollout.prompt + text

    @torch.no_grad()
    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(rollouts), self.batch_size):
            chunk = rollouts[start : start + self.batch_size]
            rows = [list(self.tokenizer(self._text(r)).input_ids) for r in chunk]
            lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
            ids = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            out = last_token_scores(self.model, ids.to(self.device), lengths.to(self.device))
            scores.extend(float(s) for s in out.cpu())
        return scores


def build_reward(
    reward: RewardSpec,
    models: Mapping[str, Path],
    device: torch.device,
    batch_size: int = 64,
) -> RewardFunction:
    """The reward function ``reward`` names; ``models`` maps field paths (``spec.models.x``)
    to model dirs, as in ``preflight.ResolvedPaths.models``."""
    if reward.type is RewardType.RULE:
        if reward.rule is None or reward.rule not in RULES:
            raise ValueError(f"unknown reward rule {reward.rule!r}; known: {sorted(RULES)}")
        return RULES[reward.rule]()
    path = model_path(models, "reward")
    if path is None:
        raise ValueError("reward.type model needs models.reward")
    return ModelReward(path, device, batch_size)


def model_path(models: Mapping[str, Path], name: str) -> Path | None:
    """``models[spec.models.<name>]`` (also accepts the ``models.<name>`` spelling)."""
    for key in (f"spec.models.{name}", f"models.{name}", name):
        if key in models:
            return Path(models[key])
    return None
