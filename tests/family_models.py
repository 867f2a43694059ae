"""Shared by the draft-forward, distiller and engine tests (``test_drafters``,
``test_distill_teacher``, ``test_generation_engine``): a small random model of the Llama
family whose every optional part (projection biases, Qwen3's query/key norms) is far from its
initial value, so a forward that skipped one would not match."""

from __future__ import annotations

from typing import Any

import torch

SMALL: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,  # grouped-query attention, as the family's drafts have
    "head_dim": 32,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
"""The shape every caller starts from; ``settings`` override it."""


def family_model(config_class: str, vocab_size: int, **settings: Any) -> Any:
    """A random ``transformers`` model of ``config_class`` (e.g. ``"Qwen2Config"``), fp32,
    in eval mode: :data:`SMALL`'s shape with ``settings`` over it (sizes, extras)."""
    import transformers

    architecture = config_class.replace("Config", "ForCausalLM")
    config = getattr(transformers, config_class)(
        architectures=[architecture], vocab_size=vocab_size, **{**SMALL, **settings}
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # biases and norms away from their initial zeros and ones
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
            elif "q_norm" in name or "k_norm" in name:
                param.uniform_(0.5, 1.5)
    return model
