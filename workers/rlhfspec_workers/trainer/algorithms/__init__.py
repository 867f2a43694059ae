"""Registered RL algorithms: one module each, looked up by ``spec.algorithm.name``.

Where it sits: ``PolicyTrainer`` asks :func:`get` once for the job's algorithm and from then
on only reads the entry: its advantage estimator, whether the KL penalty goes into the loss,
and whether every row's old log-probs must exist before the first optimizer step. The
shared pieces (clipped surrogate, KL estimators, GAE, masks) stay in ``core_algos``.

Adding an algorithm (RLOO is the worked example): one module in this package that defines a
pure advantage function and calls :func:`register`, and one ``AlgorithmName`` value in
``rlhfspec_api.spec`` (plus membership in ``GROUP_ALGORITHMS`` or ``CRITIC_ALGORITHMS`` there
when it needs groups or a critic). Modules are found by listing this package, so nothing
else is edited; a test checks every ``AlgorithmName`` has an entry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhfspec_api.spec import AlgorithmName, AlgorithmSpec


@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may read, all on the trainer's device."""

    rewards: torch.Tensor
    """[B] scalar reward per sample."""
    group_index: torch.Tensor
    """[B] long: which prompt's group each sample belongs to (0..G-1)."""
    mask: torch.Tensor
    """[B, T] 1.0 on response tokens, 0.0 on padding."""
    old_logprobs: torch.Tensor
    """[B, T] the policy's log-probs before this iteration's first step (only rows the
    algorithm asked for are filled; see ``RLAlgorithm.needs_all_old_logprobs``)."""
    ref_logprobs: torch.Tensor
    """[B, T] the reference model's log-probs."""
    old_values: torch.Tensor | None
    """[B, T] the critic's values before the update (critic algorithms only)."""
    algo: AlgorithmSpec
    """The job's hyper-parameters (kl_coef, gamma, gae_lambda ...)."""


@dataclass(frozen=True)
class Advantages:
    """An estimator's output."""

    advantages: torch.Tensor
    """[B, T] per-token advantages, 0 on padding."""
    returns: torch.Tensor | None = None
    """[B, T] value targets (critic algorithms only)."""


@dataclass(frozen=True)
class RLAlgorithm:
    """One registered algorithm."""

    name: AlgorithmName
    advantages: Callable[[AdvantageInputs], Advantages]
    kl_in_loss: bool
    """Add ``kl_coef`` x the k3 KL to the reference to the loss (GRPO, RLOO); false when the
    advantages already carry the penalty (PPO's per-token rewards)."""
    needs_all_old_logprobs: bool
    """The advantages read every row's old log-probs, so all are computed before the first
    step (PPO); otherwise the first step reuses its own forward as the old log-probs."""


REGISTRY: dict[AlgorithmName, RLAlgorithm] = {}
_LOADED: list[bool] = []


def register(algorithm: RLAlgorithm) -> RLAlgorithm:
    """Add ``algorithm`` (one module per algorithm calls this at import)."""
    if algorithm.name in REGISTRY:
        raise ValueError(f"algorithm {algorithm.name.value} registered twice")
    REGISTRY[algorithm.name] = algorithm
    return algorithm


def _load_modules() -> None:
    # A module imported on its own registers only itself: list the package once regardless.
    if _LOADED:
        return
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    _LOADED.append(True)


def get(name: AlgorithmName) -> RLAlgorithm:
    """The registered algorithm ``name``; KeyError names the ones that exist."""
    _load_modules()
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(a.value for a in REGISTRY))
        raise KeyError(f"no algorithm {name.value!r} is registered (registered: {known})") from None


def registered() -> dict[AlgorithmName, RLAlgorithm]:
    """Every registered algorithm (all modules loaded)."""
    _load_modules()
    return dict(REGISTRY)
