"""GRPO/PPO advantage and loss functions against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfspec_workers.torch_models import completion_mask
from rlhfspec_workers.trainer import core_algos as ca


def test_completion_mask_stops_at_first_eos_and_keeps_sampled_pad() -> None:
    eos, pad = 2, 0
    ids = torch.tensor(
        [
            [5, 0, 7, 2, 0, 0],  # pad sampled mid-answer: still a real token
            [5, 6, 7, 8, 9, 9],  # no EOS: length 6
            [2, 9, 9, 0, 0, 0],
        ]
    )  # EOS first
    lengths = torch.tensor([4, 6, 3])
    mask = completion_mask(ids, eos, lengths)
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]
    assert pad == 0


def test_grpo_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = ca.grpo_advantages(rewards, group_size=4, eps=0.0)
    # Group 1: mean 0.5, unbiased std sqrt(1/3) -> +-0.5/0.57735 = +-0.866025
    expected = [0.866025, -0.866025, -0.866025, 0.866025]
    assert adv[:4].tolist() == pytest.approx(expected, abs=1e-5)
    # Group 2: all equal -> no signal.
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 3"):
        ca.grpo_advantages(rewards, group_size=3)


def test_kl_estimators_by_hand() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    k1 = ca.kl_per_token(logp, ref, "k1")
    k3 = ca.kl_per_token(logp, ref, "k3")
    assert k1.tolist()[0] == pytest.approx([math.log(2), 0.0])
    # k3 with r = ref/p = 0.5: r - log r - 1 = 0.5 + log 2 - 1
    assert k3.tolist()[0] == pytest.approx([0.5 + math.log(2) - 1, 0.0])
    with pytest.raises(ValueError, match="k1, k3"):
        ca.kl_per_token(logp, ref, "k2")


def test_gae_by_hand_two_steps() -> None:
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])  # the 9.0 sits on padding and must be ignored
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = ca.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    delta1 = 1.0 + 0.9 * 0.0 - 0.25
    delta0 = 0.0 + 0.9 * 0.25 - 0.5
    a1 = delta1
    a0 = delta0 + 0.9 * 0.8 * a1
    assert adv.tolist()[0] == pytest.approx([a0, a1, 0.0])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.25, 0.0])


def test_ppo_token_rewards_put_score_on_last_real_token() -> None:
    logp = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards = ca.ppo_token_rewards(torch.tensor([2.0]), logp, ref, mask, kl_coef=0.1)
    assert rewards.tolist()[0] == pytest.approx([-0.05, 2.0, 0.0])


def test_clipped_policy_loss_by_hand() -> None:
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clip_fraction = ca.clipped_policy_loss(logp, old, adv, mask, clip_range=0.2)
    # token 0: ratio 1.5, A=+1 -> max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: ratio 0.5, A=-1 -> max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clip_fraction.item() == pytest.approx(1.0)
    # Without a ratio change the loss is -mean(A) and nothing is clipped.
    loss, clip_fraction = ca.clipped_policy_loss(old, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.0)
    assert clip_fraction.item() == 0.0


def test_clipped_value_loss_by_hand() -> None:
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[0.5, 1.0]])
    mask = torch.ones(1, 2)
    loss = ca.clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: unclipped (1-0.5)^2=0.25, clipped v=0.2 -> (0.2-0.5)^2=0.09 -> 0.25
    # token 1: both 1.0
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)


def test_whiten_and_masked_mean() -> None:
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert ca.masked_mean(values, mask).item() == pytest.approx(2.0)
    white = ca.whiten(values, mask)
    assert white.tolist()[0] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)
    assert ca.masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_logprob_mismatch_sums_by_hand() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    rollout = trainer + torch.tensor([[0.1, -0.2, 9.0], [0.0, 0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the 9.0 is padding
    abs_sum, worst, kl_sum, count = ca.logprob_mismatch_sums(rollout, trainer, mask).tolist()
    assert count == 4
    assert abs_sum == pytest.approx(0.6, abs=1e-6)
    assert worst == pytest.approx(0.3, abs=1e-6)
    # k3 of KL(rollout || trainer): r = trainer - rollout = -delta; exp(r) - r - 1 per token.
    expected = sum(math.exp(-d) + d - 1 for d in (0.1, -0.2, 0.0, 0.3))
    assert kl_sum == pytest.approx(expected, abs=1e-6)
    empty = ca.logprob_mismatch_sums(rollout, trainer, torch.zeros_like(mask))
    assert empty.tolist() == [0.0, 0.0, 0.0, 0.0]
