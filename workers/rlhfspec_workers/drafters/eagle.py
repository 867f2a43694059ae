"""EAGLE drafter: vLLM's own EAGLE head (GPU only), as a fixed-mode speculative config.

Where it sits: built by the registry for ``method: eagle``. EAGLE drafts from the target's
hidden states, which vLLM does not hand to a ``custom_class`` proposer, so it cannot be one of
the adaptive proposer's per-step candidates; it runs as vLLM's native method with a fixed k
or vLLM's Dynamic SD schedule (k per batch size). vLLM-CPU has no EAGLE path: on CPU the
config is refused before any engine starts, naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

NAME = "eagle"


class EagleUnavailableError(ValueError):
    """EAGLE asked for where it cannot run."""


def speculative_config(
    draft: Path,
    num_tokens: int,
    *,
    device: str,
    field: str,
    per_batch_size: Sequence[tuple[int, int, int]] | None = None,
) -> dict[str, Any]:
    """vLLM's EAGLE config; raises :class:`EagleUnavailableError` unless ``device`` is cuda."""
    if not device.startswith("cuda"):
        raise EagleUnavailableError(
            f"{field}: eagle needs a GPU (vLLM has no EAGLE path on {device}) "
            "(use draft_model, ngram or suffix on CPU, or run the generation pods with "
            "resources.gpu >= 1)"
        )
    config: dict[str, Any] = {
        "method": "eagle",
        "model": str(draft),
        "num_speculative_tokens": num_tokens,
    }
    if per_batch_size is not None:
        config["num_speculative_tokens_per_batch_size"] = [list(r) for r in per_batch_size]
    return config
