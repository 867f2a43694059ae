"""Pure advantage and loss functions of GRPO and PPO (verl ``core_algos`` style).

Where it sits: the trainer calls these on tensors built from scored rollouts (experience).
No model, no optimizer, no I/O: every function maps tensors to tensors, documents its shapes
and is tested against hand-computed values. Shapes: ``B`` sequences, ``T`` response tokens
(right-padded); ``mask`` [B, T] is 1.0 on real response tokens (up to and including EOS).
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is 1. values, mask: same shape."""
    if dim is None:
        return (values * mask).sum()
    return (values * mask).sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over masked entries (0 when the mask is empty, never NaN)."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """Group-normalised advantages, one per sequence.

    rewards: [B] with B = num_groups * group_size, grouped contiguously (all samples of a prompt
    adjacent). Returns [B]: (r - mean(group)) / (std(group) + eps); std is the unbiased sample
    standard deviation as in GRPO. A group whose rewards are all equal gets zero advantage.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        std = grouped.std(dim=1, keepdim=True)
        # Equal rewards carry no signal: zero advantage, never 0/0.
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(-1)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens. [B, T] -> [B, T].

    k1 = logp - ref_logp (unbiased, can be negative); k3 = exp(ref - logp) - (ref - logp) - 1
    (unbiased, always >= 0, lower variance; GRPO's choice).
    """
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (allowed: k1, k3)")


def ppo_token_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """PPO's per-token reward: -kl_coef * k1 KL on every token, plus the score on the last.

    scores: [B]; logp, ref_logp, mask: [B, T]. Returns [B, T] (0 where mask is 0).
    """
    rewards = -kl_coef * kl_per_token(logp, ref_logp, "k1") * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    rewards, values, mask: [B, T]. The value after the last real token is 0 (episode ends).
    Returns (advantages [B, T], returns [B, T]) with returns = advantages + values.
    """
    batch, width = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(width)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # Padding positions carry nothing back: reset through the mask.
        running = running * m
        advantages[:, t] = running
        next_value = values[:, t] * m
    returns = advantages + values
    return advantages * mask, returns * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise masked entries to mean 0, std 1 (PPO advantages). [B, T] -> [B, T]."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO/GRPO clipped surrogate. Returns (loss scalar, clip fraction scalar).

    logp, old_logp, mask: [B, T]; advantages: [B, T] (GRPO broadcasts its [B] advantage over
    the sequence). Token-mean over all masked tokens of the micro-batch.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(logp.dtype), mask)
    return loss, clip_fraction


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """PPO value loss with value clipping: 0.5 * max((v - R)^2, (clip(v) - R)^2). [B, T] -> []."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def grpo_advantages_by_group(
    rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Group-normalised advantages for groups of any size, in any order.

    rewards: [B]; group_index: [B] long in 0..G-1 (which prompt's group each sample is in).
    Returns [B]: (r - mean(group)) / (std(group) + eps) with the unbiased std, like
    :func:`grpo_advantages`; a group of one, or of equal rewards, gets zero advantage (a sample
    that failed and was dropped must not turn its siblings' advantages into 0/0).
    """
    groups = int(group_index.max()) + 1 if group_index.numel() else 0
    count = torch.zeros(groups, dtype=rewards.dtype, device=rewards.device)
    count.index_add_(0, group_index, torch.ones_like(rewards))
    total = torch.zeros_like(count).index_add_(0, group_index, rewards)
    mean = total / count.clamp(min=1.0)
    centred = rewards - mean[group_index]
    squares = torch.zeros_like(count).index_add_(0, group_index, centred**2)
    std = torch.sqrt(squares / (count - 1.0).clamp(min=1.0))[group_index]
    usable = (count[group_index] > 1) & (std > 0)
    return torch.where(usable, centred / (std + eps), torch.zeros_like(centred))


def logprob_mismatch_sums(
    rollout_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """How far the rollout engine's log-probs are from the trainer's, as summable parts.

    rollout_logp, trainer_logp, mask: [B, T], both log-probs of the same sampled tokens at the
    same weights. Returns float64 [4]: (sum of |rollout - trainer|, max of it, sum of the k3
    estimate of KL(rollout || trainer), token count), over masked tokens. Sums and counts add
    across micro-batches and ranks, maxima take the max; mean = sum / count.
    """
    m = mask > 0
    diff = (rollout_logp - trainer_logp).double()
    # Samples come from the rollout policy: k3 of KL(rollout || trainer).
    kl = kl_per_token(rollout_logp.double(), trainer_logp.double(), "k3")
    count = m.sum()
    worst = diff.abs()[m].max() if bool(count) else torch.zeros((), dtype=torch.float64)
    return torch.stack([diff.abs()[m].sum(), worst, kl[m].sum(), count.double()])
