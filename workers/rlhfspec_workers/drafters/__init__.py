"""Drafters for speculative decoding: one module per drafter, behind a registry.

Flow: ``registry.check`` validates a ``SpeculativeSpec`` before any engine starts;
``registry.build`` makes the per-step candidates the adaptive proposer
(``rlhfspec_workers.generation.proposer``) chooses among: ``off`` (k = 0), ``ngram`` (prompt
lookup), ``suffix`` (siblings and earlier rollouts of the same prompt) and ``draft_model`` (a
small Llama in torch). ``registry.native_config`` gives vLLM's own methods (ngram,
draft_model, eagle) for baselines. Every drafter maps ``DraftRow``s to token lists; vLLM
verifies them, so drafters change speed, never outputs.
"""

from .base import Drafter, DraftRow
from .registry import REGISTRY, DrafterConfigError, build, check, entry, native_config

__all__ = [
    "REGISTRY",
    "DraftRow",
    "Drafter",
    "DrafterConfigError",
    "build",
    "check",
    "entry",
    "native_config",
]
