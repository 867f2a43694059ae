"""What a trainer writes to storage and reads back: exported weights and exact-resume state.

Where it sits: :class:`TrainerStateIO` is a base of ``policy_trainer.PolicyTrainer``. The
trainer worker calls :meth:`~TrainerStateIO.export_weights` after every iteration (the
generation workers load that directory) and ``trainer.checkpoint.CheckpointStore`` calls
:meth:`~TrainerStateIO.save_state` / :meth:`~TrainerStateIO.load_state` every
``trainer.checkpointEvery`` iterations and at start-up.

Checkpoints live on the job's claim, which every pod of the job mounts read-write (and which
``storage.claimName`` may share with other jobs): nothing read back from it may run code, so
the optimizer and RNG states load through :func:`load_tensors` (``weights_only`` unpickling,
tensors and plain containers only) and the models as safetensors.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfspec_api.spec import AlgorithmSpec, RLHFJobSpec
from rlhfspec_workers.faults import fault_point
from rlhfspec_workers.torch_models import (
    ValueModel,
    atomic_directory,
    load_causal_lm,
    load_value_model,
    save_model_dir,
)

STATE_FILE = "trainer.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TrainerStateIO:
    """Export and checkpoint I/O over the attributes ``PolicyTrainer`` sets."""

    spec: RLHFJobSpec
    algo: AlgorithmSpec
    policy: Any
    policy_dir: Path
    policy_optimizer: torch.optim.Optimizer
    critic: ValueModel | None
    critic_dir: Path | None
    critic_optimizer: torch.optim.Optimizer | None
    shuffle: torch.Generator
    iteration: int

    def export_weights(self, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
        """Write the policy as an HF model dir vLLM loads (atomically); returns ``out_dir``.

        ``dtype`` defaults to the policy's ModelRef dtype (bf16: what vLLM serves, half the
        bytes to sync). Tokenizer and generation files come from the initial policy dir.
        The files go into a hidden temp dir (``.v<N>.tmp-*``, which no reader lists), are
        fsynced, then renamed into place and the rename fsynced: after a crash or power loss
        ``out_dir`` is absent or complete, never half-written."""
        if dtype is None:
            dtype = DTYPES[self.spec.models.policy.dtype.value]
        with atomic_directory(Path(out_dir)) as tmp:
            save_model_dir(self.policy, tmp, dtype, sidecar_from=self.policy_dir)
            fsync_tree(tmp)
            fault_point("mid_weight_write")
        fsync_dir(Path(out_dir).parent)
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
        optimizers = load_tensors(state_dir / "optimizer.pt")
        self.policy_optimizer.load_state_dict(optimizers["policy"])
        if self.critic is not None and self.critic_optimizer is not None:
            _load_weights(self.critic, load_value_model(state_dir / "critic", torch.device("cpu")))
            self.critic_optimizer.load_state_dict(optimizers["critic"])
        rng = load_tensors(state_dir / "rng.pt")
        self.shuffle.set_state(rng["shuffle"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.iteration = int(state["iteration"])
        return self.iteration


def version_of(path: Path) -> int:
    """N of a ``v<N>`` export directory (-1 for any other name)."""
    try:
        return int(path.name.removeprefix("v"))
    except ValueError:
        return -1


def prune_versions(root: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest ``v<N>`` directories under ``root``."""
    for old in sorted(root.glob("v*"), key=version_of)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (deepest first), so a rename of
    ``root`` never publishes names whose data is not on disk yet."""
    for current, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(current) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for current, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
        fsync_dir(Path(current))


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors and plain containers."""


def load_tensors(path: Path) -> Any:
    """``torch.load`` restricted to tensors, numbers, strings and containers: a file planted on
    the shared claim cannot run code in the trainer (full unpickling would call anything)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused to load (only tensors and plain containers are allowed): {exc}"
        ) from exc


def _load_weights(live: nn.Module, loaded: nn.Module) -> None:
    """Copy ``loaded``'s weights into ``live`` in place (the optimizer keeps its parameters)."""
    with torch.no_grad():
        live.load_state_dict(loaded.state_dict())
