"""Session fixtures of the model zoo, registered by the root conftest (``pytest_plugins``).

``smollm2_dir``: SmolLM2-135M-Instruct as an HF-format bf16 directory, fetched and converted
once per machine into $RLHFSPEC_CACHE/zoo (~40 s and ~93 MB of download the first time; later
sessions and concurrent workers reuse it). :func:`write_tiny_gguf` (imported by the zoo tests):
a small synthetic GGUF (random weights, a 31-token byte-level tokenizer with a chat template)
for conversion tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SMOLLM2 = "smollm2-135m-instruct"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from rlhfspec_workers.zoo import ensure_zoo_model

    return ensure_zoo_model(SMOLLM2)


def write_tiny_gguf(path: Path, architecture: str = "llama", tensors: bool = True) -> Path:
    """A GGUF with ``general.architecture`` = ``architecture``: for ``llama`` a complete
    1-layer model (hidden 16) transformers can load; ``tensors=False`` writes metadata only."""
    import gguf  # type: ignore[import-untyped,unused-ignore]
    import numpy as np

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "ab"]
    vocab, hidden, ffn = len(tokens), 16, 32
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    if tensors:
        rng = np.random.default_rng(0)
        shapes = {
            "token_embd.weight": (vocab, hidden),
            "blk.0.attn_q.weight": (hidden, hidden),
            "blk.0.attn_k.weight": (hidden // 2, hidden),
            "blk.0.attn_v.weight": (hidden // 2, hidden),
            "blk.0.attn_output.weight": (hidden, hidden),
            "blk.0.ffn_gate.weight": (ffn, hidden),
            "blk.0.ffn_up.weight": (ffn, hidden),
            "blk.0.ffn_down.weight": (hidden, ffn),
        }
        for name, shape in shapes.items():
            writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
        for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
            writer.add_tensor(name, np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
