"""The drafter registry: method name -> how to check it, build it, or hand it to vLLM natively.

Where it sits: ``generation.engine.GenerationEngine`` calls :func:`check` before starting any
engine (so a bad config fails in milliseconds with ``generation.speculative...: problem
(allowed)`` lines, not minutes later inside vLLM), then either :func:`build` for each per-step
candidate of the adaptive proposer, or :func:`native_config` for vLLM's own methods (the
benchmark baselines: fixed k, and vLLM Dynamic SD's k per batch size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfspec_api.errors import FieldError
from rlhfspec_api.generation import MAX_DRAFT_TOKENS_LIMIT, DrafterSpec, SpeculativeSpec

from . import draft_model, eagle, ngram, off, suffix
from .base import Drafter


@dataclass(frozen=True)
class DrafterEntry:
    name: str
    needs_model: bool
    per_step: bool
    """Can be a per-step candidate of the adaptive proposer."""
    native: bool
    """Has a vLLM-native config (baseline) usable on this install."""


REGISTRY: dict[str, DrafterEntry] = {
    off.NAME: DrafterEntry(off.NAME, needs_model=False, per_step=True, native=True),
    ngram.NAME: DrafterEntry(ngram.NAME, needs_model=False, per_step=True, native=True),
    suffix.NAME: DrafterEntry(suffix.NAME, needs_model=False, per_step=True, native=False),
    draft_model.NAME: DrafterEntry(draft_model.NAME, needs_model=True, per_step=True, native=True),
    eagle.NAME: DrafterEntry(eagle.NAME, needs_model=True, per_step=False, native=True),
}


class DrafterConfigError(ValueError):
    """One or more problems with the speculative config, each pinned to its field."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


def entry(name: str, field: str = "drafter") -> DrafterEntry:
    """The registry entry of ``name``; :class:`DrafterConfigError` naming ``field`` if unknown."""
    if name not in REGISTRY:
        raise DrafterConfigError(
            [FieldError(field, f"unknown drafter {name!r}", "one of " + ", ".join(REGISTRY))]
        )
    return REGISTRY[name]


def _check_k(k: int, field: str) -> list[FieldError]:
    if not 1 <= k <= MAX_DRAFT_TOKENS_LIMIT:
        return [FieldError(field, f"k={k} is out of range", f"1..{MAX_DRAFT_TOKENS_LIMIT}")]
    return []


def check(
    spec: SpeculativeSpec,
    policy: Path,
    drafts: Mapping[int, Path],
    *,
    device: str,
    native: bool = False,
    per_batch_size: Sequence[tuple[int, int, int]] | None = None,
    prefix: str = "generation.speculative",
) -> None:
    """Every problem that would stop an engine from starting with ``spec``, raised together.

    drafts: resolved model directory per drafter index (model-based drafters only).
    native: use vLLM's own method for the (single) drafter instead of the adaptive proposer.
    """
    errors: list[FieldError] = []
    errors += _check_k(spec.max_draft_tokens, f"{prefix}.maxDraftTokens")
    for lo, hi, k in per_batch_size or ():
        if k != 0:
            errors += _check_k(k, f"{prefix}.perBatchSize[{lo}..{hi}]")
    for i, d in enumerate(spec.drafters):
        field = f"{prefix}.drafters[{i}]"
        method = d.method.value if hasattr(d.method, "value") else str(d.method)
        if method not in REGISTRY:
            errors.append(
                FieldError(
                    f"{field}.method",
                    f"unknown drafter {method!r}",
                    "one of " + ", ".join(REGISTRY),
                )
            )
            continue
        e = REGISTRY[method]
        if e.needs_model:
            path = drafts.get(i)
            if path is None:
                errors.append(FieldError(f"{field}.model", "no resolved model path", "a model"))
            elif problem := draft_model.check_vocab(policy, path):
                errors.append(
                    FieldError(
                        f"{field}.model",
                        f"{d.model.path if d.model else path}: {problem}",
                        "a draft model with the policy's tokenizer",
                    )
                )
        if method == eagle.NAME and not device.startswith("cuda"):
            errors.append(
                FieldError(
                    f"{field}.method",
                    f"eagle needs a GPU (vLLM has no EAGLE path on {device})",
                    "draft_model, ngram or suffix on CPU, or resources.gpu >= 1",
                )
            )
        elif native and not e.native:
            errors.append(
                FieldError(
                    f"{field}.method",
                    f"{method} has no vLLM-native baseline here (vLLM's suffix needs "
                    "arctic-inference)",
                    "ngram or draft_model, or the adaptive proposer",
                )
            )
        elif not native and not e.per_step:
            errors.append(
                FieldError(
                    f"{field}.method",
                    f"{method} cannot be switched per step (vLLM gives custom proposers no "
                    "hidden states)",
                    "mode fixed with the native backend",
                )
            )
    if native and len(spec.drafters) != 1:
        errors.append(
            FieldError(f"{prefix}.drafters", "the native backend runs exactly one drafter", "one")
        )
    if errors:
        raise DrafterConfigError(errors)


def build(
    spec: DrafterSpec,
    model_path: Path | None,
    *,
    max_slots: int,
    max_len: int,
    device: str = "cpu",
    field: str = "drafter",
) -> Drafter:
    """A per-step candidate drafter for the adaptive proposer."""
    method = spec.method.value if hasattr(spec.method, "value") else str(spec.method)
    e = entry(method, field)
    if method == ngram.NAME:
        return ngram.NgramDrafter.from_spec(spec)
    if method == suffix.NAME:
        return suffix.SuffixDrafter.from_spec(spec)
    if method == draft_model.NAME:
        if model_path is None:
            raise DrafterConfigError([FieldError(f"{field}.model", "no model path", "a model")])
        import torch  # heavy; only model-based drafters need it

        # On CPU the draft computes in float32: eager bf16 matmuls of these small shapes run
        # ~10x slower than fp32 there (torch 2.13 CPU, measured; vLLM's own kernels differ).
        dtype = torch.float32
        if device != "cpu" and spec.model is not None:
            dtype = getattr(torch, spec.model.dtype.value)
        return draft_model.DraftModelDrafter(
            model_path, max_slots=max_slots, max_len=max_len, dtype=dtype, device=device
        )
    if method == off.NAME:
        return off.OffDrafter()
    raise DrafterConfigError(
        [FieldError(f"{field}.method", f"{e.name} is not a per-step drafter", "native backend")]
    )


def native_config(
    spec: DrafterSpec,
    num_tokens: int,
    model_path: Path | None,
    *,
    device: str,
    per_batch_size: Sequence[tuple[int, int, int]] | None = None,
    field: str = "drafter",
) -> dict[str, Any] | None:
    """vLLM's own speculative config for one drafter (baselines). ``device`` is no longer
    read here: the engine runs :func:`check` on its device first, which refuses eagle off-GPU."""
    method = spec.method.value if hasattr(spec.method, "value") else str(spec.method)
    entry(method, field)
    if method == ngram.NAME:
        config = ngram.speculative_config(spec, num_tokens)
        if per_batch_size is not None:
            config["num_speculative_tokens_per_batch_size"] = [list(r) for r in per_batch_size]
        return config
    if method == draft_model.NAME and model_path is not None:
        return draft_model.speculative_config(model_path, num_tokens, per_batch_size)
    if method == eagle.NAME and model_path is not None:
        # check() refused eagle off-GPU at engine start, before this is called.
        return eagle.speculative_config(model_path, num_tokens, per_batch_size=per_batch_size)
    if method == off.NAME:
        return None  # no speculative config at all: no proposer, no rejection sampler
    raise DrafterConfigError(
        [FieldError(f"{field}.method", f"{method} has no vLLM-native config", "ngram, draft_model")]
    )
