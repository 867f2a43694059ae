"""Experience messages -> the tensors one training iteration works on.

Where it sits: inside ``trainer.policy_trainer``. :func:`collate` turns an iteration's
:class:`Experience` list into :class:`IterationTensors` (every per-token quantity as a
``[B, T]`` tensor whose column ``j`` is response token ``j`` of every row, whatever the prompt
length), and :meth:`IterationTensors.micro_batch` cuts a subset back out, re-padded to that
subset's own widths so a micro-batch of short answers does not pay for the longest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlhfspec_workers.messages import Experience
from rlhfspec_workers.torch_models import PaddedBatch, pad_batch


def _rows(values: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    """Right-pad float lists with 0 into [len(values), width]."""
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, row in enumerate(values):
        if row:
            out[i, : len(row)] = torch.tensor(list(row), dtype=torch.float32)
    return out


def group_indices(experiences: Sequence[Experience]) -> torch.Tensor:
    """[B] long: index of each sample's GRPO group, keyed by (iteration, group_id)."""
    keys: dict[tuple[int, str], int] = {}
    index = [
        keys.setdefault((e.rollout.iteration, e.rollout.group_id), len(keys)) for e in experiences
    ]
    return torch.tensor(index, dtype=torch.long)


@dataclass
class IterationTensors:
    """Per-token tensors of one iteration, [B, T] on ``device`` (0 where ``mask`` is 0)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    pad_id: int
    eos_id: int | None
    device: torch.device
    mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    """The generation engine's log-probs of the sampled tokens: the behaviour policy in the
    engine's numerics. Only for the mismatch metrics; the loss's old log-probs are the
    trainer's own (``extra["old_logprobs"]``, see ``policy_trainer``)."""
    ref_logprobs: torch.Tensor
    rewards: torch.Tensor
    """[B] sequence rewards."""
    group_index: torch.Tensor
    """[B] GRPO group of each row."""
    experience_values: torch.Tensor | None
    """ppo: the inference stage's critic values, when every experience carried them."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """[B, T] tensors computed later (old log-probs, advantages, returns, old values)."""

    @property
    def size(self) -> int:
        return len(self.prompt_ids)

    def lengths(self) -> torch.Tensor:
        """[B] real response tokens per row (on cpu)."""
        return self.mask.sum(dim=1).cpu()

    def padded(self, rows: Sequence[int]) -> PaddedBatch:
        """The model inputs of ``rows``, padded to their own widths."""
        return pad_batch(
            [self.prompt_ids[i] for i in rows],
            [self.response_ids[i] for i in rows],
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            device=self.device,
        )

    def micro_batch(self, rows: Sequence[int]) -> tuple[PaddedBatch, dict[str, torch.Tensor]]:
        """(model inputs of ``rows``, every [B, T] tensor of ``rows`` trimmed to their T).

        The dict holds ``mask``, ``ref_logprobs`` and every ``extra`` entry.
        """
        batch = self.padded(rows)
        width = batch.response_ids.shape[1]
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        named = {"mask": self.mask, "ref_logprobs": self.ref_logprobs, **self.extra}
        return batch, {k: v.index_select(0, index)[:, :width] for k, v in named.items()}


def collate(
    experiences: Sequence[Experience], pad_id: int, eos_id: int | None, device: torch.device
) -> IterationTensors:
    """Stack an iteration's experiences; checks every per-token list is aligned."""
    for e in experiences:
        n = len(e.rollout.token_ids)
        lists = {"rollout.logprobs": e.rollout.logprobs, "ref_logprobs": e.ref_logprobs}
        if e.values is not None:
            lists["values"] = e.values
        for name, entries in lists.items():
            if len(entries) != n:
                raise ValueError(
                    f"{e.rollout.sample_id}: {name} has {len(entries)} entries for {n} tokens"
                )
    prompts = [list(e.rollout.prompt_token_ids) for e in experiences]
    responses = [list(e.rollout.token_ids) for e in experiences]
    full = pad_batch(prompts, responses, pad_id=pad_id, eos_id=eos_id)
    width = full.response_ids.shape[1]
    mask = full.response_mask
    with_values = all(e.values is not None for e in experiences)
    values = _rows([e.values or [] for e in experiences], width) * mask if with_values else None
    return IterationTensors(
        prompt_ids=prompts,
        response_ids=responses,
        pad_id=pad_id,
        eos_id=eos_id,
        device=device,
        mask=mask.to(device),
        rollout_logprobs=(_rows([e.rollout.logprobs for e in experiences], width) * mask).to(
            device
        ),
        ref_logprobs=(_rows([e.ref_logprobs for e in experiences], width) * mask).to(device),
        rewards=torch.tensor([e.reward for e in experiences], dtype=torch.float32).to(device),
        group_index=group_indices(experiences).to(device),
        experience_values=None if values is None else values.to(device),
    )
