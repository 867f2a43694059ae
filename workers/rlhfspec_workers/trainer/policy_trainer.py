"""The policy (and critic) update of one RLHF iteration: GRPO, PPO or RLOO on scored rollouts.

Where it sits: the training stage. The trainer worker (which owns the Redis loop) collects an
iteration's :class:`Experience` messages, calls :meth:`PolicyTrainer.train_iteration`, then
``export_weights`` into the directory it announces in ``WeightsPublished``, and saves a
checkpoint through ``trainer.checkpoint.CheckpointStore`` (``save_state`` / ``load_state``;
both in ``trainer.state_io``). The math is ``core_algos``'s, the advantage estimator and the
loss's KL term the registered algorithm's (``trainer.algorithms``), the cuts ``micro_batches``'.

One iteration: sort by sample id (so the result does not depend on the order Redis delivered
the messages), shuffle with the trainer's own seeded generator, split into
``algorithm.mini_batches`` optimizer steps and each step into length-bucketed micro-batches of
at most ``micro_batch_size`` rows whose gradients accumulate. Each micro-batch's loss is
weighted by its share of the step's response tokens, so the step's gradient is the token-mean
over the mini-batch whatever the micro-batch cut or the number of ranks.

Old log-probs (the denominator of the PPO/GRPO ratio) are the trainer's own, at the weights
before the first step: the engine that sampled the rollouts computes them with other kernels
(vLLM in bf16 differs from a plain forward by up to ~0.05 per token), and a ratio against those
would clip and weight tokens by numerics instead of by policy change. The first optimizer step
reuses the detached log-probs of its own forward (the weights have not moved: ratio exactly 1,
no extra pass); the other steps' rows get theirs from a no-grad pass before the first step,
with the same micro-batch cut, so (M - 1) / M of a forward is the cost. PPO needs them for
every row before the first step (its token rewards carry the KL), so it pays one full
forward. The rollout's log-probs are kept for :class:`TrainStats`' mismatch metrics (how far
the engine's numerics are from the trainer's at equal weights).

Data parallel: when ``torch.distributed`` is initialised with world_size > 1, every rank gets
the same experiences, takes its share of each mini-batch, and gradients are all-reduced
(summed: the token weights already divide by the global count) before clipping. This is
DDP's arithmetic without DDP's wrapper, whose hooks would hang when ranks run different
numbers of micro-batches.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.messages import Experience
from rlhfspec_workers.micro_batches import length_buckets, overhead_tokens, split_even
from rlhfspec_workers.torch_models import (
    ValueModel,
    default_device,
    eos_token_id,
    load_causal_lm,
    load_value_model,
    response_logprobs,
    response_logprobs_and_entropy,
    response_values,
)
from rlhfspec_workers.trainer import algorithms
from rlhfspec_workers.trainer import core_algos as ca
from rlhfspec_workers.trainer.algorithms import AdvantageInputs
from rlhfspec_workers.trainer.experience_batch import IterationTensors, collate
from rlhfspec_workers.trainer.state_io import TrainerStateIO

MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class TrainStats:
    """What one :meth:`PolicyTrainer.train_iteration` did (means over its optimizer steps)."""

    policy_loss: float
    value_loss: float | None
    kl: float
    """Token-mean k3 estimate of KL(policy || reference) during the update."""
    entropy: float
    clip_fraction: float
    grad_norm: float
    """Policy gradient norm before clipping, mean over optimizer steps."""
    reward_mean: float
    reward_std: float
    """Population std of the sequence rewards."""
    response_length_mean: float
    seconds: float
    samples: int
    optimizer_steps: int
    logprob_mismatch_mean: float = 0.0
    """Mean |log p_rollout - log p_trainer| over response tokens, at the pre-update weights."""
    logprob_mismatch_max: float = 0.0
    rollout_kl: float = 0.0
    """Token-mean k3 estimate of KL(rollout policy || trainer policy) at the old weights."""
    old_logprob_seconds: float = 0.0
    """Of ``seconds``: the no-grad pass computing old log-probs (0 for GRPO with one step)."""

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _distributed() -> tuple[int, int]:
    """(rank, world_size); (0, 1) unless torch.distributed is initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PolicyTrainer(TrainerStateIO):
    """GRPO or PPO updates of a policy (and a critic for ppo), in fp32 on ``device``.

    ``critic_dir`` (ppo): the value model's initial weights, a sequence-classification model
    (the kit's reward model works). ``recompute_values`` (ppo): compute the old values with
    this trainer's critic (always the current one) instead of using ``Experience.values``,
    which an inference worker only gets right if it reloads the critic every iteration.
    """

    def __init__(
        self,
        spec: RLHFJobSpec,
        policy_dir: Path,
        critic_dir: Path | None = None,
        device: torch.device | None = None,
        recompute_values: bool = True,
    ) -> None:
        self.spec = spec
        self.algo = spec.algorithm
        self.device = device or default_device()
        self.policy_dir = Path(policy_dir)
        self.critic_dir = None if critic_dir is None else Path(critic_dir)
        self.temperature = spec.generation.temperature
        self.recompute_values = recompute_values
        self.rank, self.world_size = _distributed()
        self.algorithm = algorithms.get(self.algo.name)
        if self.algo.needs_critic and critic_dir is None:
            raise ValueError(f"{self.algo.name.value} needs a critic (critic_dir)")
        torch.manual_seed(self.algo.seed)
        self.policy: Any = load_causal_lm(self.policy_dir, self.device, trainable=True)
        pad = self.policy.config.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else 0
        self.eos_id = eos_token_id(self.policy_dir)
        self.policy_optimizer = self._adam(self.policy.parameters())
        self.critic: ValueModel | None = None
        self.critic_optimizer: torch.optim.Optimizer | None = None
        if self.algo.needs_critic and self.critic_dir is not None:
            self.critic = load_value_model(self.critic_dir, self.device, trainable=True)
            self.critic_optimizer = self._adam(self.critic.parameters())
        # Mini-batch shuffling has its own generator so checkpoints can restore it exactly.
        self.shuffle = torch.Generator().manual_seed(self.algo.seed)
        self.iteration = 0
        """The last iteration trained (0 before any)."""

    def _adam(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.algo.learning_rate, weight_decay=0.0)

    # --- one iteration ---------------------------------------------------------------------

    def train_iteration(self, experiences: Sequence[Experience]) -> TrainStats:
        """Update the policy (and critic) on one iteration's experiences; returns its stats."""
        if not experiences:
            raise ValueError("no experiences to train on")
        started = time.perf_counter()
        ordered = sorted(experiences, key=lambda e: e.rollout.sample_id)
        data = collate(ordered, self.pad_id, self.eos_id, self.device)
        order = torch.randperm(data.size, generator=self.shuffle).tolist()
        mini_batches = split_even(order, min(self.algo.mini_batches, data.size))
        plan = [self._micro_batches(data, rows) for rows in mini_batches]
        # GRPO's first step reads its old log-probs off its own forward; PPO's rewards need
        # every row's before any step.
        reuse_first = not self.algorithm.needs_all_old_logprobs
        old_started = time.perf_counter()
        self._old_logprobs(data, plan[1:] if reuse_first else plan)
        old_seconds = time.perf_counter() - old_started
        self._advantages(data)
        totals: dict[str, float] = {}
        for step, (rows, micros) in enumerate(zip(mini_batches, plan, strict=True)):
            self._optimizer_step(data, rows, micros, totals, reuse_first and step == 0)
        mismatch = self._mismatch(data, plan)
        steps = len(mini_batches)
        self.iteration = max(e.rollout.iteration for e in experiences)
        rewards = data.rewards
        return TrainStats(
            policy_loss=totals["policy_loss"] / steps,
            value_loss=totals["value_loss"] / steps if self.critic is not None else None,
            kl=totals["kl"] / steps,
            entropy=totals["entropy"] / steps,
            clip_fraction=totals["clip_fraction"] / steps,
            grad_norm=totals["grad_norm"] / steps,
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std(correction=0)),
            response_length_mean=float(data.lengths().mean()),
            seconds=time.perf_counter() - started,
            samples=data.size,
            optimizer_steps=steps,
            logprob_mismatch_mean=mismatch[0],
            logprob_mismatch_max=mismatch[1],
            rollout_kl=mismatch[2],
            old_logprob_seconds=old_seconds,
        )

    @torch.no_grad()
    def _old_logprobs(self, data: IterationTensors, plan: Sequence[list[list[int]]]) -> None:
        """Fill ``data.extra["old_logprobs"]`` [B, T] with the current policy's log-probs for
        the rows of ``plan`` (the rest stay 0 until their forward fills them).

        Same micro-batch cut as the optimizer steps: a row's old and new log-probs come from
        the same shapes, so before the weights move their ratio is 1 to the bit."""
        old = torch.zeros_like(data.mask)
        for micros in plan:
            for rows in micros:
                batch = data.padded(rows)
                logp = response_logprobs(self.policy, batch, self.temperature)
                _write_rows(old, rows, logp)
        if self.algorithm.needs_all_old_logprobs:
            # Every row's advantages need them; each rank computed its own rows (others 0).
            self._all_reduce([old])
        data.extra["old_logprobs"] = old

    @torch.no_grad()
    def _advantages(self, data: IterationTensors) -> None:
        """Fill ``data.extra``: advantages [B, T] (and old_values, returns with a critic)."""
        old_values = self._old_values(data) if self.algo.needs_critic else None
        result = self.algorithm.advantages(
            AdvantageInputs(
                rewards=data.rewards,
                group_index=data.group_index,
                mask=data.mask,
                old_logprobs=data.extra["old_logprobs"],
                ref_logprobs=data.ref_logprobs,
                old_values=old_values,
                algo=self.algo,
            )
        )
        data.extra["advantages"] = result.advantages
        if old_values is not None and result.returns is not None:
            data.extra["returns"] = result.returns
            data.extra["old_values"] = old_values

    def _old_values(self, data: IterationTensors) -> torch.Tensor:
        if not self.recompute_values:
            if data.experience_values is None:
                raise ValueError("experiences carry no values (recompute_values=False)")
            return data.experience_values
        if self.critic is None:
            raise ValueError(f"{self.algo.name.value} needs a critic")
        values = torch.zeros_like(data.mask)
        rows = list(range(data.size))
        for start in range(0, data.size, self.algo.micro_batch_size):
            chunk = rows[start : start + self.algo.micro_batch_size]
            _write_rows(values, chunk, response_values(self.critic, data.padded(chunk)))
        return values * data.mask

    def _micro_batches(self, data: IterationTensors, rows: list[int]) -> list[list[int]]:
        """This rank's share of a mini-batch, cut into length buckets (less padding)."""
        mine = rows[self.rank :: self.world_size]
        lengths = data.lengths()
        needed = [len(data.prompt_ids[i]) + int(lengths[i]) for i in mine]
        overhead = overhead_tokens(self.device)
        return length_buckets(mine, needed, self.algo.micro_batch_size, overhead)

    def _optimizer_step(
        self,
        data: IterationTensors,
        rows: list[int],
        micros: list[list[int]],
        totals: dict[str, float],
        reuse_forward: bool,
    ) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mini_tokens = float(data.mask.index_select(0, index).sum().clamp(min=1.0))
        sums = torch.zeros(5, dtype=torch.float64)
        for micro in micros:
            sums += self._accumulate(data, micro, mini_tokens, reuse_forward)
        self._all_reduce([sums])
        self._all_reduce([p.grad for p in self.policy.parameters() if p.grad is not None])
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), MAX_GRAD_NORM)
        self.policy_optimizer.step()
        self.policy_optimizer.zero_grad(set_to_none=True)
        if self.critic is not None and self.critic_optimizer is not None:
            grads = [p.grad for p in self.critic.parameters() if p.grad is not None]
            self._all_reduce(grads)
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), MAX_GRAD_NORM)
            self.critic_optimizer.step()
            self.critic_optimizer.zero_grad(set_to_none=True)
        names = ("policy_loss", "value_loss", "kl", "entropy", "clip_fraction")
        for name, value in zip(names, sums.tolist(), strict=True):
            totals[name] = totals.get(name, 0.0) + value
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(norm)

    def _accumulate(
        self, data: IterationTensors, rows: list[int], mini_tokens: float, reuse_forward: bool
    ) -> torch.Tensor:
        """Backward one micro-batch; returns its token-weighted stat sums (float64 [5]).

        ``reuse_forward``: the weights are still the old ones, so this forward's detached
        log-probs are the old log-probs (recorded for the mismatch metrics too)."""
        batch, t = data.micro_batch(rows)
        mask = t["mask"]
        logp, entropy = response_logprobs_and_entropy(self.policy, batch, self.temperature)
        old_logp = t["old_logprobs"]
        if reuse_forward:
            old_logp = logp.detach()
            _write_rows(data.extra["old_logprobs"], rows, old_logp)
        policy_loss, clip_fraction = ca.clipped_policy_loss(
            logp, old_logp, t["advantages"], mask, self.algo.clip_range
        )
        kl = ca.masked_mean(ca.kl_per_token(logp, t["ref_logprobs"], "k3"), mask)
        # GRPO and RLOO put the KL in the loss; PPO already paid it in the token rewards.
        loss = policy_loss + self.algo.kl_coef * kl if self.algorithm.kl_in_loss else policy_loss
        value_loss = torch.zeros(())
        if self.critic is not None:
            values = response_values(self.critic, batch)
            value_loss = ca.clipped_value_loss(
                values, t["old_values"], t["returns"], mask, self.algo.value_clip_range
            )
            loss = loss + value_loss
        weight = float(mask.sum()) / mini_tokens
        # Gradients are summed over ranks, so each rank's share is weighted by global tokens.
        scaled: Any = loss * weight  # Tensor.backward is untyped in torch's stubs
        scaled.backward()
        entropy_mean = ca.masked_mean(entropy, mask) if entropy is not None else torch.zeros(())
        stats = [policy_loss, value_loss, kl, entropy_mean, clip_fraction]
        return torch.tensor([float(s.detach()) * weight for s in stats], dtype=torch.float64)

    def _mismatch(
        self, data: IterationTensors, plan: Sequence[list[list[int]]]
    ) -> tuple[float, float, float]:
        """(mean, max |rollout - trainer| log-prob, k3 KL(rollout || trainer)) over every
        rank's own rows, at the pre-update weights."""
        own = torch.zeros(data.size, 1, device=self.device)
        for micros in plan:
            for rows in micros:
                own[rows] = 1.0
        sums = ca.logprob_mismatch_sums(
            data.rollout_logprobs, data.extra["old_logprobs"], data.mask * own
        ).cpu()
        totals = sums[[0, 2, 3]].clone()
        worst = sums[1:2].clone()
        self._all_reduce([totals])
        if self.world_size > 1:
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        count = max(float(totals[2]), 1.0)
        return float(totals[0]) / count, float(worst[0]), float(totals[1]) / count

    def _all_reduce(self, tensors: Sequence[torch.Tensor]) -> None:
        if self.world_size == 1 or not tensors:
            return
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)


def _write_rows(target: torch.Tensor, rows: Sequence[int], values: torch.Tensor) -> None:
    """``target[rows[i], :width] = values[i]`` for a [len(rows), width] block."""
    index = torch.tensor(list(rows), dtype=torch.long, device=target.device)
    target[index, : values.shape[1]] = values.to(target.dtype)
