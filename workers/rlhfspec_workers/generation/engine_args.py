"""What a ``GenerationEngine`` asks vLLM for: the speculative config, the engine args and
each request's sampling parameters.

Where it sits: ``engine.GenerationEngine.__init__`` calls the first two pure functions before
it builds vLLM's ``LLMEngine``; nothing here starts an engine, so a bad speculative config
fails in milliseconds with the field named (``drafters.registry.check``).
``GenerationEngine.submit`` gets each sample's ``SamplingParams`` from
:func:`sampling_params`.

Speculation backends: the adaptive proposer (modes adaptive and fixed) is vLLM's
``custom_class`` proposer with ``num_speculative_tokens`` = the largest k; native
(baselines, and ``selector.execution: native``) is vLLM's own method for the single drafter,
fixed k or Dynamic SD's k per batch size; mode off has no speculative config at all (no
proposer, no rejection sampler).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from rlhfspec_api.generation import GenerationSpec, SpeculativeMode, SpeculativeSpec
from rlhfspec_workers.drafters import registry
from rlhfspec_workers.drafters.base import Drafter
from rlhfspec_workers.hardware import resolve_engine_dtype

from .proposer import GROUP_KEY, PROPOSER_CLASS
from .records import PromptInput, SamplingConfig

DEFAULT_CPU_KV_BYTES = 512 << 20


def speculative_config_for(
    spec: SpeculativeSpec,
    policy_model: Path,
    drafts: Mapping[int, Path],
    max_k: int,
    *,
    device: str,
    native: bool,
    per_batch_size: Sequence[tuple[int, int, int]] | None,
) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` for ``spec`` (None in mode off), after checking it."""
    if spec.mode is SpeculativeMode.OFF:
        return None
    registry.check(
        spec, policy_model, drafts, device=device, native=native, per_batch_size=per_batch_size
    )
    if native:
        return registry.native_config(
            spec.drafters[0],
            max_k,
            drafts.get(0),
            per_batch_size=per_batch_size,
            field="generation.speculative.drafters[0]",
        )
    return {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": max_k}


def per_step_drafters(
    spec: SpeculativeSpec, drafts: Mapping[int, Path], max_slots: int, max_len: int, device: str
) -> dict[str, Drafter]:
    """The adaptive proposer's candidates, one per listed drafter, keyed by method."""
    built: dict[str, Drafter] = {}
    for i, d in enumerate(spec.drafters):
        drafter = registry.build(
            d,
            drafts.get(i),
            max_slots=max_slots,
            max_len=max_len,
            device=device,
            field=f"generation.speculative.drafters[{i}]",
        )
        built[drafter.name] = drafter
    return built


def has_tokenizer(policy_model: Path) -> bool:
    """Whether the model dir ships a tokenizer (the tiny kit's raw-token models may not)."""
    return (policy_model / "tokenizer_config.json").is_file() or (
        policy_model / "tokenizer.json"
    ).is_file()


def engine_args(
    spec: GenerationSpec,
    policy_model: Path,
    speculative_config: dict[str, Any] | None,
    *,
    device: str,
    dtype: str,
    seed: int,
    max_num_seqs: int,
    max_model_len: int | None,
    kv_cache_bytes: int | None,
    logprobs_mode: str,
    tokenizer: bool,
) -> dict[str, Any]:
    """``EngineArgs`` keywords of one generation engine (before KV-migration additions)."""
    args: dict[str, Any] = {
        "model": str(policy_model),
        "skip_tokenizer_init": not tokenizer,
        "dtype": resolve_engine_dtype(dtype, device),
        "seed": seed,
        "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len,
        "disable_log_stats": False,
        "enable_prefix_caching": True,
        "logprobs_mode": logprobs_mode,
        "speculative_config": speculative_config,
    }
    if speculative_config is not None:
        args["per_request_spec_decode_metrics"] = "summary"
    if device == "cpu":
        args["enforce_eager"] = True
        args["kv_cache_memory_bytes"] = kv_cache_bytes or DEFAULT_CPU_KV_BYTES
    else:
        args["gpu_memory_utilization"] = spec.gpu_memory_utilization
        if kv_cache_bytes:
            args["kv_cache_memory_bytes"] = kv_cache_bytes
    return args


def sample_seed(seed: int, prompt_id: str, index: int, resumed_at: int = 0) -> int:
    """vLLM seed of sample ``index`` of ``prompt_id``: a function of these only, so the sample's
    tokens do not depend on which engine runs it or what it is batched with. A sample resumed
    after ``resumed_at`` tokens generated elsewhere gets its own stream (reproducible for the
    same resume point; not a replay of the stream its start used)."""
    key = f"{seed}:{prompt_id}:{index}" + (f"@{resumed_at}" if resumed_at else "")
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def sampling_params(
    sampling: SamplingConfig,
    p: PromptInput,
    index: int,
    *,
    resumed_at: int,
    group: str,
    end_of_turn_ids: Sequence[int],
    detokenize: bool,
) -> SamplingParams:
    """vLLM's parameters for sample ``index`` of ``p`` (resumed after ``resumed_at`` tokens
    generated elsewhere; ``group``: its prompt group, which the proposer's suffix drafters
    read)."""
    seed = sampling.seed
    if seed is not None:
        seed = sample_seed(seed, p.prompt_id, index, resumed_at=resumed_at)
    return SamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=p.max_tokens or sampling.max_tokens,
        seed=seed,
        logprobs=sampling.top_logprobs,
        ignore_eos=sampling.ignore_eos,
        # ignore_eos (benchmarks' fixed lengths) also ignores the end-of-turn token,
        # which for ChatML models is the EOS itself.
        stop_token_ids=[
            *sampling.stop_token_ids,
            *(() if sampling.ignore_eos else end_of_turn_ids),
        ],
        stop=list(sampling.stop) or None,
        detokenize=detokenize,
        output_kind=RequestOutputKind.FINAL_ONLY,
        extra_args={GROUP_KEY: group},
    )
