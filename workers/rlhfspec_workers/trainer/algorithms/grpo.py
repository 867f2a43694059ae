"""GRPO: each sample's reward normalised within its prompt's group; KL in the loss."""

from __future__ import annotations

from rlhfspec_api.spec import AlgorithmName
from rlhfspec_workers.trainer import core_algos as ca
from rlhfspec_workers.trainer.algorithms import AdvantageInputs, Advantages, RLAlgorithm, register


def grpo_advantages(inputs: AdvantageInputs) -> Advantages:
    """(r - mean(group)) / std(group), broadcast over the response. [B] -> [B, T]."""
    per_sample = ca.grpo_advantages_by_group(inputs.rewards, inputs.group_index)
    return Advantages(per_sample.unsqueeze(1) * inputs.mask)


GRPO = register(
    RLAlgorithm(AlgorithmName.GRPO, grpo_advantages, kl_in_loss=True, needs_all_old_logprobs=False)
)
