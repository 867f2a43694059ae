"""Rollouts -> experience: reward, reference log-probs and (ppo) critic values.

Where it sits: the inference stage, between generation and training. The inference worker
(``inference.worker``, which owns the Redis loop) reads :class:`Rollout` messages, calls
:meth:`ExperienceMaker.make` on a batch of them and publishes the returned
:class:`Experience` messages for the trainer. No Redis here, so the stage is testable on its own.

Reference log-probs use the generation temperature, so the KL the trainer computes compares
the same (tempered) distributions as the rollout log-probs vLLM returned.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.messages import Experience, Rollout
from rlhfspec_workers.micro_batches import length_buckets, overhead_tokens
from rlhfspec_workers.rewards.registry import WeightedReward, build_reward, model_path
from rlhfspec_workers.torch_models import (
    ValueModel,
    default_device,
    eos_token_id,
    load_causal_lm,
    load_value_model,
    pad_batch,
    response_logprobs,
    response_values,
)


@dataclass
class MakeStats:
    """Timings of the last :meth:`ExperienceMaker.make` call (for metrics)."""

    samples: int = 0
    reward_seconds: float = 0.0
    reference_seconds: float = 0.0
    critic_seconds: float = 0.0


class ExperienceMaker:
    """Scores rollouts of one job. Models load once, in fp32, on ``device``.

    ``models``: field path -> model dir, as in ``preflight.ResolvedPaths.models``
    (``spec.models.policy`` required; ``spec.models.reference`` defaults to the policy's
    initial weights; ``spec.models.critic`` is needed for ppo, ``spec.models.reward`` for a
    model reward).
    """

    def __init__(
        self,
        spec: RLHFJobSpec,
        models: Mapping[str, Path],
        device: torch.device | None = None,
    ) -> None:
        self.spec = spec
        self.device = device or default_device()
        self.batch_size = spec.inference.batch_size
        self.temperature = spec.generation.temperature
        policy_dir = model_path(models, "policy")
        if policy_dir is None:
            raise ValueError("models has no spec.models.policy")
        self.reference_dir = model_path(models, "reference") or policy_dir
        self.reference: Any = load_causal_lm(self.reference_dir, self.device)
        config = self.reference.config
        self.pad_id: int = int(config.pad_token_id) if config.pad_token_id is not None else 0
        self.eos_id = eos_token_id(self.reference_dir)
        self.reward: WeightedReward = build_reward(
            spec.named_reward_terms, models, self.device, self.batch_size
        )
        self.critic: ValueModel | None = None
        if spec.algorithm.needs_critic:
            critic_dir = model_path(models, "critic")
            if critic_dir is None:
                raise ValueError(f"{spec.algorithm.name.value} needs spec.models.critic")
            self.load_critic(critic_dir)
        self.last_stats = MakeStats()

    def score(self, rollouts: Sequence[Rollout]) -> list[float]:
        """The reward of each rollout, in order, and nothing else (no reference log-probs):
        held-out evaluation. Raises RewardError when a reward cannot score."""
        rewards: list[float] = []
        for start in range(0, len(rollouts), self.batch_size):
            rewards += self.reward(rollouts[start : start + self.batch_size])
        return rewards

    def load_critic(self, critic_dir: Path) -> None:
        """(Re)load the critic, e.g. weights the trainer exported after an iteration."""
        self.critic = load_value_model(critic_dir, self.device)

    @torch.no_grad()
    def make(self, rollouts: Sequence[Rollout]) -> list[Experience]:
        """One :class:`Experience` per rollout, in the same order.

        ``ref_logprobs`` (and ``values`` for ppo) have exactly ``len(rollout.token_ids)``
        entries; entries after a response's first EOS (none from vLLM, which stops there) are 0.
        A reward that cannot score raises RewardError (from ``rewards.base``).
        """
        stats = MakeStats(samples=len(rollouts))
        t = time.perf_counter()
        rewards = self.score(rollouts)
        stats.reward_seconds += time.perf_counter() - t
        ref: list[list[float]] = [[] for _ in rollouts]
        values: list[list[float]] | None = None if self.critic is None else [[] for _ in rollouts]
        # Forward passes over rows of similar length (padding costs as much as a real token;
        # rollout lengths are long-tailed), at most batch_size rows each, then back in order.
        lengths = [len(r.prompt_token_ids) + len(r.token_ids) for r in rollouts]
        for rows in length_buckets(
            list(range(len(rollouts))), lengths, self.batch_size, overhead_tokens(self.device)
        ):
            chunk_ref, chunk_values = self._token_stats([rollouts[i] for i in rows], stats)
            for j, i in enumerate(rows):
                ref[i] = chunk_ref[j]
                if values is not None and chunk_values is not None:
                    values[i] = chunk_values[j]
        experiences = [
            Experience(
                rollout=rollout,
                reward=float(reward),
                ref_logprobs=ref[i][: len(rollout.token_ids)],
                values=None if values is None else values[i][: len(rollout.token_ids)],
            )
            for i, (rollout, reward) in enumerate(zip(rollouts, rewards, strict=True))
        ]
        self.last_stats = stats
        return experiences

    def _token_stats(
        self, chunk: Sequence[Rollout], stats: MakeStats
    ) -> tuple[list[list[float]], list[list[float]] | None]:
        batch = pad_batch(
            [r.prompt_token_ids for r in chunk],
            [r.token_ids for r in chunk],
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            device=self.device,
        )
        t = time.perf_counter()
        ref = response_logprobs(self.reference, batch, self.temperature).cpu().tolist()
        stats.reference_seconds += time.perf_counter() - t
        if self.critic is None:
            return ref, None
        t = time.perf_counter()
        values = response_values(self.critic, batch).cpu().tolist()
        stats.critic_seconds += time.perf_counter() - t
        return ref, values
