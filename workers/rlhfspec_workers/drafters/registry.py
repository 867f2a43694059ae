"""The drafter registry: method name -> how to check it, build it, or hand it to vLLM natively.

Where it sits: ``generation.engine.GenerationEngine`` calls :func:`check` before starting any
engine (so a bad config fails in milliseconds with ``generation.speculative...: problem
(allowed)`` lines, not minutes later inside vLLM), then either :func:`build` for each per-step
candidate of the adaptive proposer, or :func:`native_config` for vLLM's own methods (the
benchmark baselines: fixed k, and vLLM Dynamic SD's k per batch size).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhfspec_api.errors import FieldError
from rlhfspec_api.generation import MAX_DRAFT_TOKENS_LIMIT, DrafterSpec, SpeculativeSpec

from . import draft_model
from .base import BuildContext, Drafter, DrafterEntry, NativeContext

# Modules of this package that are not drafters (no ``ENTRY``).
_NOT_DRAFTERS = frozenset({"base", "registry", "llama_forward"})


def _discover() -> dict[str, DrafterEntry]:
    """Every drafter module's ``ENTRY``: adding a drafter is adding its module."""
    found: dict[str, DrafterEntry] = {}
    for module in pkgutil.iter_modules(_package_path()):
        if module.name in _NOT_DRAFTERS:
            continue
        entry_ = getattr(importlib.import_module(f"{__package__}.{module.name}"), "ENTRY", None)
        if isinstance(entry_, DrafterEntry):
            found[entry_.name] = entry_
    return found


def _package_path() -> list[str]:
    return list(importlib.import_module(__package__ or "rlhfspec_workers.drafters").__path__)


REGISTRY: dict[str, DrafterEntry] = _discover()


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
            elif (
                method == draft_model.NAME
                and not native
                and (problem := draft_model.check_forward(path))
            ):
                errors.append(
                    FieldError(
                        f"{field}.model",
                        f"{d.model.path if d.model else path}: {problem}",
                        "a draft of the Llama family (Llama, Mistral, Qwen2, Qwen3) for the "
                        "adaptive proposer, or selector.execution: native",
                    )
                )
        if e.missing is not None and (lacking := e.missing()) is not None:
            errors.append(
                FieldError(
                    f"{field}.method",
                    f"{method} cannot run on this install: {lacking}",
                    "another drafter method, or install what it names",
                )
            )
        if e.gpu_only and not device.startswith("cuda"):
            cpu_ones = ", ".join(n for n, x in REGISTRY.items() if not x.gpu_only and n != "off")
            errors.append(
                FieldError(
                    f"{field}.method",
                    f"{method} needs a GPU (vLLM has no {method} path on {device})",
                    f"{cpu_ones} on CPU, or resources.gpu >= 1",
                )
            )
        elif native and e.native is None:
            natives = ", ".join(n for n, x in REGISTRY.items() if x.native and n != "off")
            errors.append(
                FieldError(
                    f"{field}.method",
                    f"{method} has no vLLM-native baseline on this install",
                    f"{natives}, or the adaptive proposer",
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
    """A per-step candidate drafter for the adaptive proposer (the entry's factory)."""
    method = spec.method.value if hasattr(spec.method, "value") else str(spec.method)
    e = entry(method, field)
    if e.build is None:
        raise DrafterConfigError(
            [FieldError(f"{field}.method", f"{e.name} is not a per-step drafter", "native backend")]
        )
    if e.needs_model and model_path is None:
        raise DrafterConfigError([FieldError(f"{field}.model", "no model path", "a model")])
    return e.build(BuildContext(spec, model_path, max_slots, max_len, device, field))


def native_config(
    spec: DrafterSpec,
    num_tokens: int,
    model_path: Path | None,
    *,
    per_batch_size: Sequence[tuple[int, int, int]] | None = None,
    field: str = "drafter",
) -> dict[str, Any] | None:
    """vLLM's own speculative config for one drafter (baselines); None for no speculative
    config at all (off). :func:`check` has refused what this device cannot run."""
    method = spec.method.value if hasattr(spec.method, "value") else str(spec.method)
    e = entry(method, field)
    if e.native is None or (e.needs_model and model_path is None):
        natives = ", ".join(n for n, x in REGISTRY.items() if x.native and n != "off")
        raise DrafterConfigError(
            [FieldError(f"{field}.method", f"{method} has no vLLM-native config", natives)]
        )
    return e.native(NativeContext(spec, num_tokens, model_path, per_batch_size))
