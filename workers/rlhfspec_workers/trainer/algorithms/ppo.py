"""PPO: per-token rewards (score on the last token, k1 KL on every token), GAE on a learned
critic's values, whitened advantages. The KL is paid in the rewards, not the loss."""

from __future__ import annotations

from rlhfspec_api.spec import AlgorithmName
from rlhfspec_workers.trainer import core_algos as ca
from rlhfspec_workers.trainer.algorithms import AdvantageInputs, Advantages, RLAlgorithm, register


def ppo_advantages(inputs: AdvantageInputs) -> Advantages:
    """GAE over the token rewards. rewards [B], log-probs and values [B, T] -> [B, T] x 2."""
    if inputs.old_values is None:
        raise ValueError("ppo needs the critic's values")
    algo = inputs.algo
    token_rewards = ca.ppo_token_rewards(
        inputs.rewards, inputs.old_logprobs, inputs.ref_logprobs, inputs.mask, algo.kl_coef
    )
    advantages, returns = ca.gae(
        token_rewards, inputs.old_values, inputs.mask, algo.gamma, algo.gae_lambda
    )
    return Advantages(ca.whiten(advantages, inputs.mask), returns)


PPO = register(
    RLAlgorithm(AlgorithmName.PPO, ppo_advantages, kl_in_loss=False, needs_all_old_logprobs=True)
)
