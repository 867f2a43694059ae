"""The build recipe of the tiny-model kit: every number that shapes the built files.

Where it sits: ``build.py`` trains models from a :class:`TinyRecipe`; the kit's cache key is a
hash of the recipe, the seed and :data:`RECIPE_VERSION`, so changing any hyperparameter (or
bumping the version after a code change that alters the weights) yields a new cache directory
instead of silently reusing stale models. Pure python: importable without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

# Bump whenever code changes would change the built bytes for the same recipe and seed.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """Llama architecture knobs (head_dim 64: vLLM CPU only supports 32/64/80/96/112/128)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    head_dim: int = 64


@dataclass(frozen=True)
class TinyRecipe:
    """Architectures and training schedule (what the defaults gave: docs/cpu-notes.md §6)."""

    target: ModelShape = ModelShape(256, 4, 4, 1024)
    draft: ModelShape = ModelShape(128, 2, 2, 512)
    reward: ModelShape = ModelShape(128, 2, 2, 512)
    max_position_embeddings: int = 128

    # Target: train until temperature-1 accuracy on a probe set reaches ``target_stop_accuracy``
    # (checked every ``target_eval_every`` steps from ``target_min_steps``), never to perfection:
    # RL needs room to improve.
    target_lr: float = 1e-3
    target_batch: int = 64
    target_min_steps: int = 100
    target_max_steps: int = 250
    target_eval_every: int = 25
    target_stop_accuracy: float = 0.5
    probe_prompts: int = 128

    # Draft: forward-KL distillation from the target on answer positions. Fewer steps than 300
    # (greedy agreement 0.93, sampling acceptance 0.91) so acceptance looks like a real
    # drafter's (0.6-0.9); 120 steps gave 0.90 here.
    draft_lr: float = 1e-3
    draft_batch: int = 64
    draft_steps: int = 100

    # Reward model: binary correctness of (prompt, completion), BCE on the score logit; its
    # backbone starts from the draft (same shape), as RLHF reward models start from the SFT
    # policy (synthetic held-out accuracy 0.60 from scratch vs 0.64 from the draft here).
    reward_lr: float = 1e-3
    reward_batch: int = 64
    reward_steps: int = 150
    reward_policy_samples: int = 512

    # Each random batch is run as this many length-sorted micro-batches (same gradient, less
    # padding); see training.length_split.
    micro_batches: int = 4
    warmup_steps: int = 10
    grad_clip: float = 1.0
    eval_prompts: int = 256
    train_rows: int = 4096
    eval_rows: int = 512
    # bf16 autocast (the first recipe's choice) pays only on CPUs with native bf16
    # (AVX512-BF16/AMX); on an AVX2-only CPU it is emulated and ~8x slower than fp32, so the
    # default trains in fp32 and only the saved weights are bf16.
    autocast_bf16: bool = False
    # Fixed thread count: CPU GEMM blocking may depend on it, and the build must be
    # byte-reproducible wherever it runs. One thread, because on a shared 2-core machine a
    # second OpenMP thread spin-waits whenever another process holds a core and small ops then
    # stall tens of times over (docs/cpu-notes.md §1; seen here: 4 ms per tiny linear at 2
    # threads).
    threads: int = 1

    def scaled(self, steps_scale: float) -> TinyRecipe:
        """Same recipe with every step count (and eval set) scaled; for fast tests."""
        if steps_scale <= 0:
            raise ValueError("steps_scale must be > 0")

        def s(n: int, floor: int = 1) -> int:
            return max(floor, math.ceil(n * steps_scale))

        return dataclasses.replace(
            self,
            target_min_steps=s(self.target_min_steps),
            target_max_steps=s(self.target_max_steps),
            target_eval_every=s(self.target_eval_every),
            draft_steps=s(self.draft_steps),
            reward_steps=s(self.reward_steps),
            reward_policy_samples=s(self.reward_policy_samples, 8),
            probe_prompts=s(self.probe_prompts, 8),
            eval_prompts=s(self.eval_prompts, 8),
            warmup_steps=s(self.warmup_steps),
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TinyRecipe:
        fields = dict(data)
        for name in ("target", "draft", "reward"):
            if isinstance(fields.get(name), dict):
                fields[name] = ModelShape(**fields[name])
        return cls(**fields)

    def key(self, seed: int) -> str:
        """Short, stable hash of (recipe, seed, RECIPE_VERSION): the cache directory name."""
        blob = json.dumps(
            {"recipe": self.to_json(), "seed": seed, "version": RECIPE_VERSION},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def derive_seed(seed: int, tag: str) -> int:
    """Independent sub-seed per build stage, so reordering stages does not reshuffle others."""
    digest = hashlib.sha256(f"{seed}:{tag}".encode()).digest()
    return int.from_bytes(digest[:4], "big")
