"""RLOO (REINFORCE leave-one-out): each sample's baseline is the mean reward of the *other*
samples of its prompt, so the baseline is independent of the sample itself (unbiased) and
needs no critic. No std scaling (unlike GRPO). The KL to the reference goes into the loss,
as GRPO does, and the clipped surrogate makes several optimizer steps per iteration safe."""

from __future__ import annotations

import torch

from rlhfspec_api.spec import AlgorithmName
from rlhfspec_workers.trainer.algorithms import AdvantageInputs, Advantages, RLAlgorithm, register


def rloo_advantages_by_group(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """r_i - mean_{j != i in i's group} r_j. rewards, group_index: [B] -> [B].

    Equal to k/(k-1) * (r_i - mean(group)) for a group of k; a group of one has no other
    sample to compare with and gets 0 (a sibling that failed and was dropped must not turn
    the survivor's advantage into 0/0).
    """
    groups = int(group_index.max()) + 1 if group_index.numel() else 0
    count = torch.zeros(groups, dtype=rewards.dtype, device=rewards.device)
    count.index_add_(0, group_index, torch.ones_like(rewards))
    total = torch.zeros_like(count).index_add_(0, group_index, rewards)
    others = (count[group_index] - 1.0).clamp(min=1.0)
    baseline = (total[group_index] - rewards) / others
    return torch.where(count[group_index] > 1, rewards - baseline, torch.zeros_like(rewards))


def rloo_advantages(inputs: AdvantageInputs) -> Advantages:
    """Leave-one-out advantage per sample, broadcast over the response. [B] -> [B, T]."""
    per_sample = rloo_advantages_by_group(inputs.rewards, inputs.group_index)
    return Advantages(per_sample.unsqueeze(1) * inputs.mask)


RLOO = register(
    RLAlgorithm(AlgorithmName.RLOO, rloo_advantages, kl_in_loss=True, needs_all_old_logprobs=False)
)
