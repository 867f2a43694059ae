"""Build a draft from a subset of the policy's own layers (embeddings and head shared).

Where it sits: step 1 of ``distill``. The Llama family of causal LMs is supported (Llama:
SmolLM2, the tiny kit, Llama 2/3; Mistral; Qwen2; Qwen3): the copy relies on their shared
module names (``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``), and
the draft it makes is one the adaptive proposer's own draft forward runs
(``drafters.llama_forward``, which defines the family).
"""

from __future__ import annotations

import copy
from typing import Any

from rlhfspec_workers.drafters.llama_forward import SUPPORTED_ARCHITECTURES


class DraftInputError(ValueError):
    """Input the draft builder refuses; ``field`` names the option or file to change."""

    def __init__(self, field: str, problem: str, allowed: str) -> None:
        super().__init__(f"{field}: {problem} ({allowed})")
        self.field = field


def pick_layers(total: int, count: int) -> list[int]:
    """``count`` of ``total`` layer indices, evenly spaced, first and last included."""
    if not 1 <= count <= total:
        raise DraftInputError(
            "--layers", f"{count} layers asked of a policy with {total}", f"1..{total}"
        )
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def check_architecture(config: Any) -> None:
    """Refuse a policy whose architecture the builder cannot copy layer by layer."""
    names = list(getattr(config, "architectures", None) or [])
    if not any(name in SUPPORTED_ARCHITECTURES for name in names):
        got = ", ".join(names) or getattr(config, "model_type", "unknown")
        raise DraftInputError(
            "--policy",
            f"architecture {got} is not supported",
            "supported: " + ", ".join(SUPPORTED_ARCHITECTURES),
        )


def draft_from_policy(policy: Any, layers: int, train_head: bool = False) -> Any:
    """A new model of ``policy``'s class with ``layers`` of its blocks (fp32, trainable).

    Embeddings, final norm and the LM head are copies of the policy's; frozen unless
    ``train_head`` (with tied embeddings they are one matrix, a third of a small model's
    parameters and most of its backward cost)."""
    check_architecture(policy.config)
    chosen = pick_layers(int(policy.config.num_hidden_layers), layers)
    config = copy.deepcopy(policy.config)
    config.num_hidden_layers = len(chosen)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in chosen]
    draft: Any = type(policy)(config)
    draft = draft.float()
    source = policy.state_dict()
    state = {}
    for name in draft.state_dict():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            state[name] = source[f"model.layers.{chosen[int(index)]}.{rest}"]
        elif name in source:
            state[name] = source[name]
        else:  # the tied head is saved once, as the embeddings
            state[name] = source["model.embed_tokens.weight"]
    draft.load_state_dict({k: v.float().clone() for k, v in state.items()})
    draft.model.embed_tokens.weight.requires_grad_(train_head)
    draft.lm_head.weight.requires_grad_(train_head)
    draft.config.rlhfspec_draft_layers = chosen
    return draft
