"""Preflight: check everything a job reads from disk before any process starts.

Where it sits: after ``rlhfspec_api.manifest.parse_rlhfjob`` (which checks the manifest
itself) and before local mode or a worker pod starts Redis, vLLM or torch. A model path that
does not exist, an unknown ``tiny://`` or ``zoo://`` name, a policy without its tokenizer, a
draft model whose vocabulary differs from the policy's, a dataset row missing a field, or a
function reward that does not import (or is not callable) is reported here as ``field.path:
what is wrong (what is allowed)`` lines, so nothing is half-started when the input is bad.
Built-in URIs are resolved by ``model_uris`` (which builds the tiny kit or fetches a zoo model
on first use); ``hf://``, ``https://`` and ``s3://`` resolve to their copy in the job's
storage, which the fetch step (``rlhfspec_workers.fetch``) downloads first. Every location
first obeys ``rlhfspec_api.locations`` (no ``pvc://`` outside the job's storage; on a cluster,
no path on the pod's own filesystem); a ``pvc://`` location is checked again once resolved,
since any pod of the job can plant a symlink on the claim.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhfspec_api.errors import FieldError
from rlhfspec_api.generation import MODEL_BASED_DRAFTERS, SpeculativeMode
from rlhfspec_api.locations import PVC_ALLOWED, location_problem
from rlhfspec_api.models import ModelRef
from rlhfspec_api.rewards import RewardRule, RewardType
from rlhfspec_api.spec import ChatTemplate, RLHFJobSpec
from rlhfspec_workers.data.rows import DatasetError, load_splits
from rlhfspec_workers.fetch.store import FetchError, is_remote, parse_remote, resolved_path
from rlhfspec_workers.model_uris import ModelURIError, Resolver, resolve_builtin
from rlhfspec_workers.rewards.base import RewardError
from rlhfspec_workers.rewards.function import import_function

# hf:// and https:// are read from their copy in the job's storage, which the fetch step
# (``rlhfspec worker fetch``: a cluster job's init container, run by hand before local mode)
# downloads; preflight never downloads them itself.
FETCH_FIRST = (
    "a location fetched into the job's storage first: on a cluster the job's fetch init "
    "container does it; locally run `rlhfspec worker fetch FILE --storage RUN_DIR` first"
)
LOCAL_ALLOWED = "a local path, file://, pvc:// (under storage), tiny:// or zoo://"
# Either file makes a directory's tokenizer loadable; the policy's is what generation encodes
# prompts with, so its absence is reported here rather than when the engine starts.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
POLICY_FIELD = "spec.models.policy"


class LocationError(ValueError):
    """A location the rules refuse; ``problem`` and ``allowed`` feed a FieldError."""

    def __init__(self, problem: str, allowed: str) -> None:
        super().__init__(f"{problem} ({allowed})")
        self.problem = problem
        self.allowed = allowed


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
    eval_dataset: Path | None = None
    """``spec.dataset.eval``'s file, when the held-out split is a file of its own."""


def resolve_location(
    location: str,
    storage_root: Path | None,
    tiny: Resolver | None = None,
    *,
    cluster: bool = False,
) -> Path:
    """Map a path or URI onto this machine's filesystem; ValueError says what is allowed
    (:class:`LocationError` for a location the rules refuse).

    ``tiny``, when given, replaces the built-in ``tiny://`` resolver (tests use a fake kit);
    ``cluster``: a worker pod, where the pod's own filesystem is not a source.
    """
    refused = location_problem(location, cluster=cluster)
    if refused is not None:
        raise LocationError(*refused)
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
        root = storage_root.resolve()
        path = (root / rest).resolve()
        if not path.is_relative_to(root):
            raise LocationError(
                f"{location!r} resolves to {path}, outside the job's storage {root} (a symlink?)",
                PVC_ALLOWED,
            )
        return path
    if is_remote(location):
        return _fetched(location, storage_root)
    raise ValueError(f"{scheme}:// locations are not supported here")


def _fetched(location: str, storage_root: Path | None) -> Path:
    """The fetched copy of a remote location; LocationError when it is not there (yet)."""
    try:
        remote = parse_remote(location)
    except FetchError as exc:
        raise LocationError(exc.problem, FETCH_FIRST) from None
    if storage_root is None:
        raise LocationError(f"{location!r} is read from the job's storage, here none", FETCH_FIRST)
    path = resolved_path(remote, storage_root)
    if not path.exists():
        raise LocationError(f"{location!r} has not been fetched (no {path})", FETCH_FIRST)
    root = storage_root.resolve()
    if not path.resolve().is_relative_to(root):  # any pod of the job can plant a symlink
        raise LocationError(
            f"{location!r}: its copy {path} leads outside the job's storage {root}", FETCH_FIRST
        )
    return path


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
    spec: RLHFJobSpec,
    storage_root: Path | None,
    tiny: Resolver | None = None,
    *,
    cluster: bool = False,
) -> tuple[dict[str, Path], list[FieldError]]:
    """Resolve and check every model directory (the policy's tokenizer included); also the
    drafters' vocabularies."""
    resolved: dict[str, Path] = {}
    errors: list[FieldError] = []
    for field, ref in model_refs(spec):
        try:
            path = resolve_location(ref.path, storage_root, tiny, cluster=cluster)
        except (ModelURIError, LocationError) as exc:
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


def has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer in ``model_dir`` defines a chat template (in its config or in
    a ``chat_template.jinja`` / ``chat_template.json`` beside it)."""
    if any((model_dir / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template"))


def needs_answer(spec: RLHFJobSpec) -> bool:
    """Whether every row must carry the answer field (a rule reward other than the regex
    format check reads it)."""
    if spec.dataset.answer_field is None:
        return False
    return any(
        term.type is RewardType.RULE and term.rule is not RewardRule.REGEX
        for term in spec.reward_terms
    )


FUNCTION_ALLOWED = (
    "package.module:function naming a callable importable here: on PYTHONPATH, installed, or "
    "(local mode) under the current directory; on a cluster, in the image or in the reward's "
    "configMap"
)


def check_rewards(spec: RLHFJobSpec) -> list[FieldError]:
    """Every function reward imports and is callable (its module is imported here, once)."""
    errors: list[FieldError] = []
    for field, term in spec.named_reward_terms:
        if term.type is not RewardType.FUNCTION or term.function is None:
            continue
        try:
            import_function(term.function, f"{field}.function")
        except RewardError as exc:
            errors.append(FieldError(exc.field, exc.message, FUNCTION_ALLOWED))
    return errors


def _resolve_dataset(
    location: str, field: str, storage_root: Path | None, tiny: Resolver | None, cluster: bool
) -> tuple[Path | None, list[FieldError]]:
    try:
        path = resolve_location(location, storage_root, tiny, cluster=cluster)
    except (ModelURIError, LocationError) as exc:
        return None, [FieldError(field, exc.problem, exc.allowed)]
    except ValueError as exc:
        return None, [FieldError(field, str(exc), LOCAL_ALLOWED)]
    if not path.is_file():
        return None, [
            FieldError(field, f"{location!r}: no such file ({path})", "a .jsonl or .parquet file")
        ]
    return path, []


def check_dataset(
    spec: RLHFJobSpec,
    storage_root: Path | None,
    tiny: Resolver | None = None,
    policy_dir: Path | None = None,
    *,
    cluster: bool = False,
) -> tuple[Path | None, Path | None, list[FieldError]]:
    """(dataset, eval split, problems): the files exist, every row has the fields the job
    reads (located by file and line), the held-out split leaves rows to train on, and chat
    prompts have a chat template to render them (``policy_dir``: the policy's directory)."""
    dataset = spec.dataset
    path, errors = _resolve_dataset(dataset.path, "spec.dataset.path", storage_root, tiny, cluster)
    eval_path = None
    if dataset.eval is not None:
        eval_path, eval_errors = _resolve_dataset(
            dataset.eval, "spec.dataset.eval", storage_root, tiny, cluster
        )
        errors += eval_errors
    if path is None or errors:
        return path, eval_path, errors
    try:
        splits = load_splits(
            path,
            eval_path,
            prompt_field=dataset.prompt_field,
            answer_field=dataset.answer_field,
            eval_fraction=dataset.eval_fraction,
            require_answer=needs_answer(spec),
            seed=spec.algorithm.seed,
        )
    except DatasetError as exc:
        return path, eval_path, [FieldError(p.field, p.message, p.allowed) for p in exc.problems]
    chat_rows = [r for r in (*splits.train, *splits.eval) if r.messages is not None]
    mode = dataset.chat_template
    if chat_rows and mode is ChatTemplate.OFF:
        errors.append(
            FieldError(
                "spec.dataset.chatTemplate",
                f"{chat_rows[0].where}: the prompt is a list of chat messages, which only the "
                "chat template can render",
                "auto or on, or string prompts",
            )
        )
    wants_template = bool(chat_rows) or mode is ChatTemplate.ON
    if wants_template and policy_dir is not None and not has_chat_template(policy_dir):
        why = f"{chat_rows[0].where} holds chat messages" if chat_rows else "chatTemplate is on"
        errors.append(
            FieldError(
                "spec.dataset.chatTemplate",
                f"{why}, but the policy's tokenizer ({policy_dir}) has no chat template",
                "a policy whose tokenizer_config.json has chat_template, or string prompts "
                "with chatTemplate off",
            )
        )
    return path, eval_path, errors


def preflight(
    spec: RLHFJobSpec,
    storage_root: Path | None = None,
    tiny: Resolver | None = None,
    *,
    cluster: bool = False,
) -> ResolvedPaths:
    """Check models, dataset and function rewards together; raise PreflightError listing
    every problem. ``cluster``: a worker pod (see ``rlhfspec_api.locations``)."""
    if storage_root is None and spec.storage.path is not None:
        storage_root = Path(spec.storage.path)
    if storage_root is None and os.environ.get("RLHFSPEC_STORAGE"):
        storage_root = Path(os.environ["RLHFSPEC_STORAGE"])
    models, errors = check_models(spec, storage_root, tiny, cluster=cluster)
    dataset, eval_dataset, dataset_errors = check_dataset(
        spec, storage_root, tiny, models.get(POLICY_FIELD), cluster=cluster
    )
    errors += dataset_errors
    errors += check_rewards(spec)
    if errors or dataset is None:
        raise PreflightError(errors)
    return ResolvedPaths(models=models, dataset=dataset, eval_dataset=eval_dataset)
