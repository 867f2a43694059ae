"""The policy (and critic) update of one RLHF iteration: GRPO or PPO on scored rollouts.

Where it sits: the training stage. The trainer worker (which owns the Redis loop) collects an
iteration's :class:`Experience` messages, calls :meth:`PolicyTrainer.train_iteration`, then
:meth:`PolicyTrainer.export_weights` into the directory it announces in ``WeightsPublished``,
and saves a checkpoint through ``trainer.checkpoint.CheckpointStore`` (which calls
:meth:`save_state` / :meth:`load_state`). The math is ``core_algos``'s.

One iteration: sort by sample id (so the result does not depend on the order Redis delivered
the messages), compute advantages over the whole iteration, shuffle with the trainer's own
seeded generator, split into ``algorithm.mini_batches`` optimizer steps and each step into
micro-batches of ``micro_batch_size`` whose gradients accumulate. Each micro-batch's loss is
weighted by its share of the mini-batch's response tokens, so the step's gradient is the
token-mean over the mini-batch whatever the micro-batch size or the number of ranks.

Data parallel: when ``torch.distributed`` is initialised with world_size > 1, every rank gets
the same experiences, takes its share of each mini-batch, and gradients are all-reduced
(summed: the token weights already divide by the global count) before clipping. This is
DDP's arithmetic without DDP's wrapper, whose hooks would hang when ranks run different
numbers of micro-batches.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfspec_api.spec import AlgorithmName, RLHFJobSpec
from rlhfspec_workers.messages import Experience
from rlhfspec_workers.torch_models import (
    ValueModel,
    atomic_directory,
    default_device,
    eos_token_id,
    load_causal_lm,
    load_value_model,
    response_logprobs_and_entropy,
    response_values,
    save_model_dir,
)
from rlhfspec_workers.trainer import core_algos as ca
from rlhfspec_workers.trainer.experience_batch import IterationTensors, collate

MAX_GRAD_NORM = 1.0
STATE_FILE = "trainer.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _distributed() -> tuple[int, int]:
    """(rank, world_size); (0, 1) unless torch.distributed is initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _split(items: Sequence[int], parts: int) -> list[list[int]]:
    """``parts`` contiguous slices whose sizes differ by at most one (none empty if possible)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (1 if k < extra else 0)
        out.append(list(items[start : start + size]))
        start += size
    return [part for part in out if part]


class PolicyTrainer:
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
        self.is_ppo = self.algo.name is AlgorithmName.PPO
        if self.is_ppo and critic_dir is None:
            raise ValueError("ppo needs a critic (critic_dir)")
        torch.manual_seed(self.algo.seed)
        self.policy: Any = load_causal_lm(self.policy_dir, self.device, trainable=True)
        pad = self.policy.config.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else 0
        self.eos_id = eos_token_id(self.policy_dir)
        self.policy_optimizer = self._adam(self.policy.parameters())
        self.critic: ValueModel | None = None
        self.critic_optimizer: torch.optim.Optimizer | None = None
        if self.is_ppo and self.critic_dir is not None:
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
        self._advantages(data)
        order = torch.randperm(data.size, generator=self.shuffle).tolist()
        mini_batches = _split(order, min(self.algo.mini_batches, data.size))
        totals: dict[str, float] = {}
        for rows in mini_batches:
            self._optimizer_step(data, rows, totals)
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
        )

    @torch.no_grad()
    def _advantages(self, data: IterationTensors) -> None:
        """Fill ``data.extra``: advantages [B, T] (and old_values, returns for ppo)."""
        if not self.is_ppo:
            per_sample = ca.grpo_advantages_by_group(data.rewards, data.group_index)
            data.extra["advantages"] = per_sample.unsqueeze(1) * data.mask
            return
        old_values = self._old_values(data)
        token_rewards = ca.ppo_token_rewards(
            data.rewards, data.old_logprobs, data.ref_logprobs, data.mask, self.algo.kl_coef
        )
        advantages, returns = ca.gae(
            token_rewards, old_values, data.mask, self.algo.gamma, self.algo.gae_lambda
        )
        data.extra["advantages"] = ca.whiten(advantages, data.mask)
        data.extra["returns"] = returns
        data.extra["old_values"] = old_values

    def _old_values(self, data: IterationTensors) -> torch.Tensor:
        if not self.recompute_values:
            if data.experience_values is None:
                raise ValueError("ppo experiences carry no values (recompute_values=False)")
            return data.experience_values
        if self.critic is None:
            raise ValueError("ppo needs a critic")
        values = torch.zeros_like(data.mask)
        rows = list(range(data.size))
        for start in range(0, data.size, self.algo.micro_batch_size):
            chunk = rows[start : start + self.algo.micro_batch_size]
            batch = data.padded(chunk)
            width = batch.response_ids.shape[1]
            values[start : start + len(chunk), :width] = response_values(self.critic, batch)
        return values * data.mask

    def _micro_batches(self, data: IterationTensors, rows: list[int]) -> list[list[int]]:
        """This rank's share of a mini-batch, length-sorted into micro-batches (less padding)."""
        mine = rows[self.rank :: self.world_size]
        lengths = data.lengths()
        mine.sort(key=lambda i: (len(data.prompt_ids[i]) + int(lengths[i]), i))
        size = self.algo.micro_batch_size
        return [mine[k : k + size] for k in range(0, len(mine), size)]

    def _optimizer_step(
        self, data: IterationTensors, rows: list[int], totals: dict[str, float]
    ) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mini_tokens = float(data.mask.index_select(0, index).sum().clamp(min=1.0))
        sums = torch.zeros(5, dtype=torch.float64)
        for micro in self._micro_batches(data, rows):
            sums += self._accumulate(data, micro, mini_tokens)
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
        self, data: IterationTensors, rows: list[int], mini_tokens: float
    ) -> torch.Tensor:
        """Backward one micro-batch; returns its token-weighted stat sums (float64 [5])."""
        batch, t = data.micro_batch(rows)
        mask = t["mask"]
        logp, entropy = response_logprobs_and_entropy(self.policy, batch, self.temperature)
        policy_loss, clip_fraction = ca.clipped_policy_loss(
            logp, t["old_logprobs"], t["advantages"], mask, self.algo.clip_range
        )
        kl = ca.masked_mean(ca.kl_per_token(logp, t["ref_logprobs"], "k3"), mask)
        # GRPO puts the KL in the loss; PPO already paid it in the token rewards.
        loss = policy_loss if self.is_ppo else policy_loss + self.algo.kl_coef * kl
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

    def _all_reduce(self, tensors: Sequence[torch.Tensor]) -> None:
        if self.world_size == 1 or not tensors:
            return
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)

    # --- weights and state -----------------------------------------------------------------

    def export_weights(self, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
        """Write the policy as an HF model dir vLLM loads (atomically); returns ``out_dir``.

        ``dtype`` defaults to the policy's ModelRef dtype (bf16: what vLLM serves, half the
        bytes to sync). Tokenizer and generation files come from the initial policy dir."""
        if dtype is None:
            dtype = _DTYPES[self.spec.models.policy.dtype.value]
        with atomic_directory(Path(out_dir)) as tmp:
            save_model_dir(self.policy, tmp, dtype, sidecar_from=self.policy_dir)
        return Path(out_dir)

    def export_critic(self, out_dir: Path) -> Path:
        """ppo: write the critic (fp32) for an inference worker's ``load_critic``."""
        if self.critic is None:
            raise ValueError("no critic to export")
        with atomic_directory(Path(out_dir)) as tmp:
            save_model_dir(self.critic, tmp, None, sidecar_from=self.critic_dir)
        return Path(out_dir)

    def save_state(self, out_dir: Path) -> None:
        """Everything an exact resume needs, into the (empty) dir ``out_dir``: fp32 HF dirs
        ``policy/`` (and ``critic/``), optimizer states, RNG states, the iteration."""
        save_model_dir(self.policy, out_dir / "policy", None, sidecar_from=self.policy_dir)
        optimizers: dict[str, Any] = {"policy": self.policy_optimizer.state_dict()}
        if self.critic is not None and self.critic_optimizer is not None:
            save_model_dir(self.critic, out_dir / "critic", None, sidecar_from=self.critic_dir)
            optimizers["critic"] = self.critic_optimizer.state_dict()
        torch.save(optimizers, out_dir / "optimizer.pt")
        rng: dict[str, Any] = {
            "shuffle": self.shuffle.get_state(),
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, out_dir / "rng.pt")
        state = {"iteration": self.iteration, "algorithm": self.algo.name.value}
        (out_dir / STATE_FILE).write_text(json.dumps(state) + "\n")

    def load_state(self, state_dir: Path) -> int:
        """Restore what :meth:`save_state` wrote; returns the iteration it was saved at."""
        state = json.loads((state_dir / STATE_FILE).read_text())
        if state["algorithm"] != self.algo.name.value:
            raise ValueError(f"checkpoint is {state['algorithm']}, job is {self.algo.name.value}")
        _load_weights(self.policy, load_causal_lm(state_dir / "policy", torch.device("cpu")))
        optimizers = torch.load(state_dir / "optimizer.pt", weights_only=False)
        self.policy_optimizer.load_state_dict(optimizers["policy"])
        if self.critic is not None and self.critic_optimizer is not None:
            _load_weights(self.critic, load_value_model(state_dir / "critic", torch.device("cpu")))
            self.critic_optimizer.load_state_dict(optimizers["critic"])
        rng = torch.load(state_dir / "rng.pt", weights_only=False)
        self.shuffle.set_state(rng["shuffle"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.iteration = int(state["iteration"])
        return self.iteration


def _load_weights(live: nn.Module, loaded: nn.Module) -> None:
    """Copy ``loaded``'s weights into ``live`` in place (the optimizer keeps its parameters)."""
    with torch.no_grad():
        live.load_state_dict(loaded.state_dict())
