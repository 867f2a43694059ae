"""A small Llama forward pass with a slot-indexed KV cache, for the draft-model drafter.

Where it sits: ``draft_model.DraftModelDrafter`` runs this inside the adaptive proposer, i.e.
inside vLLM's model runner between verification steps. vLLM's own ``draft_model`` method
cannot be switched on and off per step, so the adaptive path runs the draft itself.

Why our own forward and not ``transformers``: each vLLM request needs a cache row that can
be rolled back to the accepted prefix and topped up with any number of tokens, batched across
requests of different lengths. A preallocated ``[slot, position]`` cache does this with one
``index_put`` per layer; HF's caches either copy on growth or need one shared position per
batch. Supports the Llama family of decoders as ``save_pretrained`` writes them: Llama (RMSNorm,
GQA, SiLU MLP, tied or separate head; default or Llama-3 RoPE; optional projection biases),
Mistral (a sliding attention window), Qwen2 (q/k/v biases) and Qwen3 (per-head RMSNorm of
queries and keys before RoPE). These are the small models RL teams draft with for Llama, Qwen
and Mistral policies (e.g. Llama-3.2-1B, Qwen2.5-0.5B, Qwen3-0.6B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
INITIAL_POSITIONS = 512
"""Cache positions per slot allocated at start; more are added as contexts grow."""


def read_config(path: Path) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (raises FileNotFoundError with the path)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    data: dict[str, Any] = json.loads(config_file.read_text())
    return data


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {path}")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(str(path / shard)))
    return weights


def _inv_freq(config: dict[str, Any], head_dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies, [head_dim / 2]: default, or Llama 3's long-context scaling."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(
            f"rope_type {rope_type!r} is not supported by the draft forward (default, llama3)"
        )
    # Llama 3: wavelengths longer than the pretraining context / low_freq_factor are slowed by
    # `factor`, those shorter than it / high_freq_factor are kept, and the band between is
    # interpolated linearly in context / wavelength.
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    context = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, smoothed, scaled)


def unsupported(config: dict[str, Any]) -> str | None:
    """Why this forward cannot run the model of ``config`` (None when it can); reads only
    the config, so a job's preflight can ask before any engine starts."""
    architectures = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        return (
            f"draft architecture {architectures} is not supported (one of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    try:
        _inv_freq(config, 2)
    except (ValueError, KeyError) as err:
        return str(err) if isinstance(err, ValueError) else f"rope parameters lack {err}"
    return None


def _windows(config: dict[str, Any], num_layers: int) -> list[int | None]:
    """Each layer's sliding attention window (None: it sees the whole context).

    Mistral slides every layer when ``sliding_window`` is set; Qwen2 and Qwen3 slide only
    where ``use_sliding_window`` is on, in the layers ``layer_types`` marks (older configs:
    from ``max_window_layers`` on)."""
    window = config.get("sliding_window")
    if window is None:
        return [None] * num_layers
    if "use_sliding_window" not in config:  # Mistral
        return [int(window)] * num_layers
    if not config["use_sliding_window"]:
        return [None] * num_layers
    types = config.get("layer_types") or [
        "sliding_attention" if i >= int(config.get("max_window_layers", 0)) else "full_attention"
        for i in range(num_layers)
    ]
    return [int(window) if t == "sliding_attention" else None for t in types]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Without a bias, the plain matmul the Llama path always ran (no F.linear dispatch change).
    return x @ weight.T if bias is None else F.linear(x, weight, bias)


class LlamaDraftModel:
    """Greedy-decoding Llama with a KV cache of ``max_slots`` rows of ``max_len`` positions."""

    def __init__(
        self,
        path: Path,
        *,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> None:
        config = read_config(path)
        if (problem := unsupported(config)) is not None:
            raise ValueError(problem)
        self.vocab_size = int(config["vocab_size"])
        self.hidden = int(config["hidden_size"])
        self.num_heads = int(config["num_attention_heads"])
        self.num_kv_heads = int(config.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(config.get("head_dim") or self.hidden // self.num_heads)
        self.num_layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.max_slots, self.max_len = max_slots, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.embed = self.norm = self.lm_head = torch.empty(0)
        self.layers: list[dict[str, torch.Tensor]] = []
        self.shape: dict[str, int] | None = None
        """The loaded model's sizes: a reload must keep them."""
        self.load_weights(path)
        self.windows = _windows(config, self.num_layers)
        inv_freq = _inv_freq(config, self.head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.cos = angles.cos().to(self.device)
        self.sin = angles.sin().to(self.device)
        # Head-major rows, so a row's keys for attention are a strided view (no copy). Callers
        # keep the used slots compact (0..n-1, see DraftModelDrafter.release): attention then
        # runs on the view of the first n slots, with the batch's queries scattered into it.
        # Positions grow on demand (doubling, up to max_len): max_len is the engine's longest
        # context (8192 for SmolLM2) and max_slots its most sequences, and a cache of both
        # would hold gigabytes a job of short answers never touches (measured: a SmolLM2
        # job's generation worker killed for memory at 14.9 GB as its pages were written).
        self.capacity = min(max_len, INITIAL_POSITIONS)
        shape = (self.num_layers, max_slots, self.num_kv_heads, self.capacity, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    def _reserve(self, positions: int) -> None:
        """Make room for ``positions`` cache positions per slot (keeps what is cached)."""
        if positions <= self.capacity:
            return
        grown = min(self.max_len, max(positions, 2 * self.capacity))
        for name in ("k_cache", "v_cache"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], grown, old.shape[4]))
            new[:, :, :, : self.capacity] = old
            setattr(self, name, new)
        self.capacity = grown

    def load_weights(self, path: Path) -> None:
        """Take the weights of the model in ``path`` (at start, and when a refreshed draft is
        published). Its shape must equal this one's: the KV cache and the rotary tables are
        kept. Cached keys and values are from the old weights; callers drop them
        (``DraftModelDrafter.load_weights``)."""
        config = read_config(path)
        names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        shape = {n: int(config[n]) for n in names}
        if self.shape is not None and shape != self.shape:
            changed = [n for n in names if shape[n] != self.shape[n]]
            raise ValueError(f"draft {path} changes {', '.join(changed)}: not a reload")
        self.shape = shape
        dtype, device = self.dtype, self.device
        w = {k: v.to(dtype=dtype, device=device) for k, v in _load_weights(path).items()}
        w = {k.removeprefix("model."): v for k, v in w.items()}
        self.embed = w["embed_tokens.weight"]
        self.norm = w["norm.weight"]
        self.lm_head = w.get("lm_head.weight", self.embed)
        self.layers = []
        for i in range(self.num_layers):
            p = f"layers.{i}."
            layer = {
                # q, k, v fused into one matmul: fewer kernel launches per decode step.
                "qkv": torch.cat(
                    [w[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0
                ),
                "o": w[p + "self_attn.o_proj.weight"],
                "gate_up": torch.cat(
                    [w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]], dim=0
                ),
                "down": w[p + "mlp.down_proj.weight"],
                "ln1": w[p + "input_layernorm.weight"],
                "ln2": w[p + "post_attention_layernorm.weight"],
            }
            # What only some of the family has, read from the weights themselves: projection
            # biases (Qwen2's q/k/v; Llama's attention_bias and mlp_bias) and Qwen3's
            # per-head norms of queries and keys.
            optional = {
                "qkv_bias": [p + f"self_attn.{n}_proj.bias" for n in ("q", "k", "v")],
                "o_bias": [p + "self_attn.o_proj.bias"],
                "gate_up_bias": [p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"],
                "down_bias": [p + "mlp.down_proj.bias"],
                "q_norm": [p + "self_attn.q_norm.weight"],
                "k_norm": [p + "self_attn.k_norm.weight"],
            }
            for key, parts in optional.items():
                present = [n in w for n in parts]
                if all(present):
                    layer[key] = torch.cat([w[n] for n in parts])
                elif any(present):
                    missing = [n for n, there in zip(parts, present, strict=True) if not there]
                    raise ValueError(f"draft {path}: {', '.join(missing)} missing")
            self.layers.append(layer)

    def move_slot(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s cache into ``dst`` (compaction after a request leaves)."""
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]

    def num_parameters(self) -> int:
        tensors = [self.embed, self.norm, *(t for layer in self.layers for t in layer.values())]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        return sum(t.numel() for t in tensors)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 and cast back before the weight, as HF's LlamaRMSNorm does.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H, D]; cos, sin: [B, T, 1, D/2] in x's dtype (HF's rotate-half convention,
        # computed in the model's dtype as HF does).
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, n_new: torch.Tensor
    ) -> torch.Tensor:
        """Append ``tokens[b, :n_new[b]]`` at positions ``start[b]..`` of cache row ``slots[b]``.

        tokens: [B, T] (rows shorter than T are padded; the padding writes cache positions past
        the row's valid length, which are overwritten before anything attends to them).
        Returns the logits after each row's last real token, [B, vocab], float32.
        """
        bsz, t = tokens.shape
        pos = start[:, None] + torch.arange(t, device=self.device)[None, :]
        if int(pos.max()) >= self.max_len:
            raise ValueError(f"draft cache overflow: position {int(pos.max())} >= {self.max_len}")
        self._reserve(int(pos.max()) + 1)
        kv_len = int((start + t).max())
        n_slots = int(slots.max()) + 1
        slot_bt = slots[:, None].expand(bsz, t)
        # Attention runs over slots 0..n_slots-1, straight on the cache (a strided view, no
        # copy). When the batch is exactly those slots in order (the usual case: callers keep
        # slots compact) the queries are used as they are; otherwise they are scattered into
        # slot order, and slots outside the batch get position 0 (their discarded output
        # costs little because slots are compact).
        in_order = n_slots == bsz and torch.equal(slots, torch.arange(bsz, device=self.device))
        slot_pos = pos
        if not in_order:
            slot_pos = torch.zeros((n_slots, t), dtype=pos.dtype, device=self.device)
            slot_pos[slots] = pos
        # Query t of a slot may see keys 0..its position: [slot, 1, T, kv_len]; in a layer
        # with a sliding window w, only the last w of them (key > position - w).
        key_pos = torch.arange(kv_len, device=self.device)[None, None, None, :]
        query_pos = slot_pos[:, None, :, None]
        causal = key_pos <= query_pos
        masks = {
            window: causal if window is None else causal & (key_pos > query_pos - window)
            for window in set(self.windows)
        }
        cos = self.cos[pos].unsqueeze(2).to(self.dtype)
        sin = self.sin[pos].unsqueeze(2).to(self.dtype)
        x = F.embedding(tokens, self.embed)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        grouped = self.num_heads != self.num_kv_heads
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer["ln1"])
            qkv = _linear(h, layer["qkv"], layer.get("qkv_bias"))
            q, k, v = qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., -kv_size:]
            q = q.view(bsz, t, self.num_heads, self.head_dim)
            k = k.view(bsz, t, self.num_kv_heads, self.head_dim)
            if "q_norm" in layer:
                q, k = self._rms(q, layer["q_norm"]), self._rms(k, layer["k_norm"])
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            v = v.view(bsz, t, self.num_kv_heads, self.head_dim)
            self.k_cache[i][slot_bt, :, pos] = k
            self.v_cache[i][slot_bt, :, pos] = v
            keys = self.k_cache[i, :n_slots, :, :kv_len]
            values = self.v_cache[i, :n_slots, :, :kv_len]
            if not in_order:
                scattered = q.new_zeros((n_slots, t, self.num_heads, self.head_dim))
                scattered[slots] = q
                q = scattered
            # torch's fused CPU attention: no [slot, head, T, kv_len] float scores in memory.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                keys,
                values,
                attn_mask=masks[self.windows[i]],
                enable_gqa=grouped,
            ).transpose(1, 2)
            if not in_order:
                out = out[slots]
            x = x + _linear(out.reshape(bsz, t, q_size), layer["o"], layer.get("o_bias"))
            h = self._rms(x, layer["ln2"])
            gate, up = _linear(h, layer["gate_up"], layer.get("gate_up_bias")).chunk(2, dim=-1)
            x = x + _linear(F.silu(gate) * up, layer["down"], layer.get("down_bias"))
        last = x[torch.arange(bsz, device=self.device), n_new - 1]
        return (self._rms(last, self.norm) @ self.lm_head.T).float()
