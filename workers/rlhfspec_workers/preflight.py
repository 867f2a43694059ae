"""Preflight: check everything a job reads from disk before any process starts.

Where it sits: after ``rlhfspec_api.manifest.parse_rlhfjob`` (which checks the manifest
itself) and before local mode or a worker pod starts Redis, vLLM or torch. A model path that
does not exist, an unknown ``tiny://`` or ``zoo://`` name, a policy without its tokenizer, a
draft model whose vocabulary differs from the policy's, or a dataset row missing a field is
reported here as ``field.path: what is wrong (what is allowed)`` lines, so nothing is
half-started when the input is bad. Built-in URIs are resolved by ``model_uris`` (which builds
the tiny kit or fetches a zoo model on first use).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhfspec_api.errors import FieldError
from rlhfspec_api.generation import MODEL_BASED_DRAFTERS, SpeculativeMode
from rlhfspec_api.models import ModelRef
from rlhfspec_api.spec import RewardType, RLHFJobSpec
from rlhfspec_workers.model_uris import ModelURIError, Resolver, resolve_builtin

# Remote schemes are fetched by an init container on a cluster; local mode reads files only.
REMOTE_SCHEMES = ("hf", "s3", "gs")
LOCAL_ALLOWED = "a local path, file://, pvc:// (under storage), tiny:// or zoo://"
# Either file makes a directory's tokenizer loadable; the policy's is what generation encodes
# prompts with, so its absence is reported here rather than when the engine starts.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
POLICY_FIELD = "spec.models.policy"
MAX_ROWS_CHECKED = 100_000


class PreflightError(Exception):
    """The job cannot start; ``errors`` lists every reason."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class ResolvedPaths:
    """Filesystem locations of everything the job reads."""

    models: dict[str, Path]
    """Field path (e.g. ``models.policy``) -> model directory."""
    dataset: Path


def resolve_location(
    location: str, storage_root: Path | None, tiny: Resolver | None = None
) -> Path:
    """Map a path or URI onto this machine's filesystem; ValueError says what is allowed.

    ``tiny``, when given, replaces the built-in ``tiny://`` resolver (tests use a fake kit).
    """
    scheme, _, rest = location.partition("://")
    if not rest:
        return Path(location).expanduser()
    builtin = resolve_builtin(location, {"tiny": tiny} if tiny is not None else None)
    if builtin is not None:
        return builtin
    if scheme == "file":
        return Path(rest)
    if scheme == "pvc":
        if storage_root is None:
            raise ValueError(f"{location!r} needs job storage (set spec.storage.path)")
        return storage_root / rest
    raise ValueError(f"{scheme}:// locations are fetched on a cluster, not in local mode")


def model_refs(spec: RLHFJobSpec) -> Iterator[tuple[str, ModelRef]]:
    """Every model the job uses, with the field path that names it."""
    models = spec.models
    for name in ("policy", "reference", "critic", "reward"):
        ref = getattr(models, name)
        if ref is not None:
            yield f"spec.models.{name}", ref
    if spec.generation.speculative.mode is not SpeculativeMode.OFF:
        for index, drafter in enumerate(spec.generation.speculative.drafters):
            if drafter.method in MODEL_BASED_DRAFTERS and drafter.model is not None:
                yield f"spec.generation.speculative.drafters[{index}].model", drafter.model


def _vocab_size(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("vocab_size")
    return int(value) if isinstance(value, int) else None


def check_models(
    spec: RLHFJobSpec, storage_root: Path | None, tiny: Resolver | None = None
) -> tuple[dict[str, Path], list[FieldError]]:
    """Resolve and check every model directory (the policy's tokenizer included); also the
    drafters' vocabularies."""
    resolved: dict[str, Path] = {}
    errors: list[FieldError] = []
    for field, ref in model_refs(spec):
        try:
            path = resolve_location(ref.path, storage_root, tiny)
        except ModelURIError as exc:
            errors.append(FieldError(f"{field}.path", exc.problem, exc.allowed))
            continue
        except ValueError as exc:
            errors.append(FieldError(f"{field}.path", str(exc), LOCAL_ALLOWED))
            continue
        if not (path / "config.json").is_file():
            problem = (
                f"{ref.path!r}: no such directory ({path})"
                if not path.exists()
                else f"{ref.path!r}: {path} has no config.json"
            )
            errors.append(FieldError(f"{field}.path", problem, "an HF-format model directory"))
            continue
        if field == POLICY_FIELD and not any((path / f).is_file() for f in TOKENIZER_FILES):
            errors.append(
                FieldError(
                    f"{field}.path",
                    f"{ref.path!r}: {path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})",
                    "an HF-format model directory with its tokenizer",
                )
            )
            continue
        resolved[field] = path
    policy_vocab = _vocab_size(resolved[POLICY_FIELD]) if (POLICY_FIELD in resolved) else None
    for field, path in resolved.items():
        if ".drafters[" not in field or policy_vocab is None:
            continue
        vocab = _vocab_size(path)
        if vocab != policy_vocab:
            errors.append(
                FieldError(
                    f"{field}.path",
                    f"the draft model's vocabulary ({vocab}) differs from the policy's "
                    f"({policy_vocab})",
                    "a draft model sharing the policy's tokenizer",
                )
            )
    return resolved, errors


def check_dataset(
    spec: RLHFJobSpec, storage_root: Path | None, tiny: Resolver | None = None
) -> tuple[Path | None, list[FieldError]]:
    """The dataset exists and every row is a JSON object with the fields the job reads."""
    dataset = spec.dataset
    try:
        path = resolve_location(dataset.path, storage_root, tiny)
    except ModelURIError as exc:
        return None, [FieldError("spec.dataset.path", exc.problem, exc.allowed)]
    except ValueError as exc:
        return None, [FieldError("spec.dataset.path", str(exc), LOCAL_ALLOWED)]
    if not path.is_file():
        return None, [
            FieldError(
                "spec.dataset.path", f"{dataset.path!r}: no such file ({path})", "a .jsonl file"
            )
        ]
    needed = [("spec.dataset.promptField", dataset.prompt_field)]
    if spec.reward.type is RewardType.RULE and dataset.answer_field is not None:
        needed.append(("spec.dataset.answerField", dataset.answer_field))
    errors: list[FieldError] = []
    rows = 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if number > MAX_ROWS_CHECKED or len(errors) >= 5:
                break
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except ValueError as exc:
                errors.append(
                    FieldError(
                        "spec.dataset.path",
                        f"{path}:{number}: not JSON ({exc})",
                        "one JSON object per line",
                    )
                )
                continue
            for field, key in needed:
                if not isinstance(row, dict) or not isinstance(row.get(key), str):
                    errors.append(
                        FieldError(
                            field,
                            f"{path}:{number}: row has no string field {key!r}",
                            "every row has it, or change the field name",
                        )
                    )
    if rows == 0 and not errors:
        errors.append(FieldError("spec.dataset.path", f"{path} has no rows", "a non-empty .jsonl"))
    return path, errors


def preflight(
    spec: RLHFJobSpec,
    storage_root: Path | None = None,
    tiny: Resolver | None = None,
) -> ResolvedPaths:
    """Check models and dataset together; raise PreflightError listing every problem."""
    if storage_root is None and spec.storage.path is not None:
        storage_root = Path(spec.storage.path)
    if storage_root is None and os.environ.get("RLHFSPEC_STORAGE"):
        storage_root = Path(os.environ["RLHFSPEC_STORAGE"])
    models, errors = check_models(spec, storage_root, tiny)
    dataset, dataset_errors = check_dataset(spec, storage_root, tiny)
    errors += dataset_errors
    if errors or dataset is None:
        raise PreflightError(errors)
    return ResolvedPaths(models=models, dataset=dataset)
