"""Reward ``model``: a sequence-classification reward model's score of prompt + response.

Where it sits: ``registry`` builds a :class:`ModelReward` for ``{type: model}`` from the
directory of ``spec.models.reward``, on the inference worker's device. The only reward module
that needs torch; the registry imports it only when a job uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from rlhfspec_workers.messages import Rollout
from rlhfspec_workers.torch_models import ValueModel, last_token_scores, load_value_model

NAME = "model"
FIELD = "spec.models.reward"


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
