"""Verification-cost grid t(B, T) of a target model on a GPU: the selector's cost table there.

Usage (on the GPU machine, which has torch and transformers but neither vLLM nor this
project's dependencies, hence a standalone script)::

    python bench/gpu_verify_grid.py --out DIR [--budget-seconds 420]

For every model in ``MODELS`` (random weights with the real model's shape: step time does
not depend on the weights' values) and every batch size B and draft length T - 1, it times
one forward of B rows x T new tokens on top of a ``--context``-token KV cache, logits
included: exactly a speculative verification step of T tokens per row (T = 1 is plain
decoding). A row's cache is cut back to the context after each timed forward, so every cell
sees the same context. Each cell is the median of ``--reps`` timed forwards after
``--warmup`` untimed ones, with the device synchronised around each.

What it leaves out, so the grid is an upper bound on a serving engine's step: CUDA graphs
(eager launches cost ~10-20 us per kernel, felt at small B), paged attention and vLLM's
scheduler and sampler. ``rlhfspec bench project`` turns the grid into a cost model and
replays this machine's acceptance traces on it.

Where a target has a draft in ``DRAFTS`` (the small model of its family a team would draft
with), the script also times the adaptive proposer's own draft forward
(``workers/rlhfspec_workers/drafters/llama_forward.py``, loaded from this checkout by path: it
needs only torch and safetensors) on random weights of that shape: one forward of B rows x T
tokens on a ``--context``-token cache, T = 1 (a draft position) and 2 (the catch-up over the
tokens the last step accepted). The projection prices the draft model from these instead of
scaling this machine's draft cost by the target's speed-up.

Writes ``DIR/verify-grid.json``::

    {"schema": "rlhfspec.bench.verify_grid/v1", "device": ..., "torch": ..., "models": [
      {"name": ..., "dtype": ..., "context": ..., "config": {...},
       "samples": [[B, T, median_seconds, [each timed seconds...]], ...],
       "draft": {"name": ..., "config": {...}, "samples": [[B, T, median, [...]], ...]}}, ...]}

after every model (a run stopped by its budget keeps what it measured).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct's config.json (the project's real test model).
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    # Qwen2.5-7B's shape (random weights: the "7B-shaped" target).
    "qwen2.5-7b-shape": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    # The target `rlhfspec bench reallocation --target-size 512x8` runs on (its real 2-worker
    # runs are under bench/data/): timed on a CPU, it checks the grid path of
    # `reallocation_sim --cost-grid` against those runs' measured step tables.
    "bench-512x8": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    # A model small enough for a CPU smoke test of this script.
    "tiny": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
}
DRAFTS: dict[str, dict[str, Any]] = {
    # Qwen2.5-0.5B's shape: the Qwen2.5-7B target's natural draft (same tokenizer).
    "qwen2.5-7b-shape": {
        "name": "qwen2.5-0.5b-shape",
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    # The tiny kit's draft (the bench's `draft_model`): on a CPU its timings check this path
    # against the bench's own drafting costs.
    "bench-512x8": {
        "name": "bench-draft",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "name": "tiny-draft",
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 512,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
}
DRAFT_TOKENS = (1, 2)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKENS = tuple(range(1, 10))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _cpu_name() -> str:
    """ "cpu: <model name>[, amx]" from /proc/cpuinfo (just "cpu" where it is unreadable): a
    CPU grid is only comparable with runs on the same CPU kind."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "")  # fmt: skip
    return f"cpu: {name}{', amx' if ' amx_bf16' in info else ''}" if name else "cpu"


def build(name: str, dtype: Any, device: Any, spec: dict[str, Any] | None = None) -> Any:
    """The model ``name`` of ``MODELS`` (or the config ``spec``) with random weights, in eval
    mode on ``device``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in (spec or MODELS[name]).items() if k != "name"}
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers before 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.eval()


def timed(
    call: Callable[[], Any],
    device: Any,
    warmup: int,
    reps: int,
    after: Callable[[], Any] | None = None,
) -> list[Any]:
    """[median seconds, [timed seconds]] of ``reps`` calls after ``warmup`` untimed ones, the
    device synchronised around each; ``after`` runs after every call, untimed."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: list[float] = []
    for i in range(warmup + reps):
        sync()
        started = time.perf_counter()
        call()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - started)
        if after is not None:
            after()
    return [statistics.median(times), [round(x, 6) for x in times]]


def measure_model(
    model: Any,
    batches: tuple[int, ...],
    tokens: tuple[int, ...],
    *,
    context: int,
    warmup: int,
    reps: int,
    deadline: float,
) -> list[list[Any]]:
    """[B, T, median seconds, [timed seconds]] per cell, batch by batch, until ``deadline``."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    samples: list[list[Any]] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for batch in batches:
        if time.monotonic() >= deadline:
            break
        prompt = torch.randint(3, vocab, (batch, context), generator=gen).to(device)
        with torch.inference_mode():
            cache = DynamicCache()
            model.model(input_ids=prompt, past_key_values=cache, use_cache=True)
            for t in tokens:
                if time.monotonic() >= deadline:
                    break
                ids = torch.randint(3, vocab, (batch, t), generator=gen).to(device)
                step = functools.partial(
                    model, input_ids=ids, past_key_values=cache, use_cache=True
                )
                # After each forward: back to the context (negative: drop the last t).
                after = functools.partial(cache.crop, -t)
                samples.append([batch, t, *timed(step, device, warmup, reps, after=after)])
        del cache, prompt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return samples


def _draft_forward_class() -> Any:
    """``LlamaDraftModel`` from this checkout's file, without importing the package (the GPU
    machine has torch and transformers, not this project's dependencies)."""
    import importlib.util

    path = (
        Path(__file__).resolve().parents[1] / "workers/rlhfspec_workers/drafters/llama_forward.py"
    )
    spec = importlib.util.spec_from_file_location("rlhfspec_draft_forward", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LlamaDraftModel


def measure_draft(
    target: str,
    dtype: Any,
    device: Any,
    batches: tuple[int, ...],
    *,
    context: int,
    warmup: int,
    reps: int,
    deadline: float,
) -> dict[str, Any] | None:
    """The proposer's draft forward for ``target``'s draft (``DRAFTS``): [B, T, median
    seconds, [timed seconds]] per cell, or None when the target has no draft listed."""
    import tempfile

    import torch

    spec = DRAFTS.get(target)
    if spec is None or time.monotonic() >= deadline:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        build(spec["name"], dtype, "cpu", spec).save_pretrained(tmp)
        draft = _draft_forward_class()(
            Path(tmp), max_slots=max(batches), max_len=context + 8, dtype=dtype, device=device
        )
    dev = draft.device
    samples: list[list[Any]] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab = int(spec["vocab_size"])
    with torch.inference_mode():
        for batch in batches:
            if time.monotonic() >= deadline:
                break
            slots = torch.arange(batch, device=dev)
            prompt = torch.randint(3, vocab, (batch, context), generator=gen).to(dev)
            zeros = torch.zeros(batch, dtype=torch.long, device=dev)
            draft.forward(prompt, slots, zeros, zeros + context)
            for t in DRAFT_TOKENS:
                ids = torch.randint(3, vocab, (batch, t), generator=gen).to(dev)
                # Positions context.. are rewritten by every call: the cache stays the
                # prompt's, as the target's does after its crop.
                step = functools.partial(draft.forward, ids, slots, zeros + context, zeros + t)
                samples.append([batch, t, *timed(step, dev, warmup, reps)])
    del draft
    return {"name": spec["name"], "config": spec, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-7b-shape")
    parser.add_argument("--batches", type=_ints, default=BATCHES)
    parser.add_argument("--tokens", type=_ints, default=TOKENS)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--budget-seconds", type=float, default=420.0)
    args = parser.parse_args(argv)

    import torch
    import transformers

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype = getattr(torch, args.dtype)
    started = time.monotonic()
    deadline = started + args.budget_seconds
    doc: dict[str, Any] = {
        "schema": "rlhfspec.bench.verify_grid/v1",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "models": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "verify-grid.json"
    for name in [m for m in args.models.split(",") if m]:
        if time.monotonic() >= deadline:
            break
        # The draft first: a few seconds, where the target's grid may run into the budget.
        timed_draft = measure_draft(
            name,
            dtype,
            device,
            args.batches,
            context=args.context,
            warmup=args.warmup,
            reps=args.reps,
            deadline=deadline,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = build(name, dtype, device)
        samples = measure_model(
            model,
            args.batches,
            args.tokens,
            context=args.context,
            warmup=args.warmup,
            reps=args.reps,
            deadline=deadline,
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        entry: dict[str, Any] = {
            "name": name,
            "dtype": args.dtype,
            "context": args.context,
            "config": MODELS[name],
            "samples": samples,
        }
        if timed_draft is not None and timed_draft["samples"]:
            entry["draft"] = timed_draft
        doc["models"].append(entry)
        out.write_text(json.dumps(doc, indent=1))
        drafted = len(entry["draft"]["samples"]) if "draft" in entry else 0
        print(
            f"{name}: {len(samples)} cells, {drafted} draft cells, "
            f"{time.monotonic() - started:.0f}s",
            flush=True,
        )
    out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
