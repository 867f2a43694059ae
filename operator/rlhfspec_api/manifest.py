"""Parse RLHFJob manifests once: YAML files -> typed ``RLHFJob`` objects or field errors.

Where it sits: the single entry point for turning user input into the contract. ``rlhfspec
validate`` and ``rlhfspec run`` call :func:`load_documents` + :func:`parse_rlhfjob`; the
operator calls :func:`parse_rlhfjob` on the object the API server hands it. Nothing
downstream re-reads raw dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rlhfspec_api import API_GROUP, API_VERSION, KIND
from rlhfspec_api.bounded_yaml import MAX_FILE_BYTES, InputRefused, load_all
from rlhfspec_api.echo import ECHO_CHARS, cap, echo, key_text
from rlhfspec_api.errors import FieldError, field_errors
from rlhfspec_api.metadata import metadata_errors
from rlhfspec_api.spec import RLHFJobSpec

FULL_API_VERSION = f"{API_GROUP}/{API_VERSION}"
# One line per problem, but not thousands: a document with 10,000 unknown keys reports the
# first MAX_ERRORS and how many more there were (the operator copies these into its status).
MAX_ERRORS = 50
_TOP_LEVEL_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")


class ManifestError(Exception):
    """Input that is not a valid RLHFJob; ``errors`` has one line per problem."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


class DocumentError(Exception):
    """A file that cannot be read as YAML at all (one clear line, never a traceback)."""


@dataclass(frozen=True)
class RLHFJob:
    """A parsed RLHFJob: identity plus the typed spec. Status is the operator's business."""

    name: str
    namespace: str
    spec: RLHFJobSpec
    metadata: Mapping[str, Any]

    def to_manifest(self) -> dict[str, Any]:
        """The job as an applyable manifest (spec fully defaulted)."""
        meta: dict[str, Any] = {"name": self.name}
        if self.namespace:
            meta["namespace"] = self.namespace
        for key in ("labels", "annotations"):
            if self.metadata.get(key):
                meta[key] = dict(self.metadata[key])
        return {
            "apiVersion": FULL_API_VERSION,
            "kind": KIND,
            "metadata": meta,
            "spec": self.spec.to_wire(),
        }


@dataclass(frozen=True)
class Document:
    """One YAML document of a file, with where it came from."""

    source: str
    index: int
    content: object

    @property
    def label(self) -> str:
        return self.source if self.index == 0 else f"{self.source}[doc {self.index + 1}]"


def load_documents(path: Path) -> list[Document]:
    """All non-empty YAML documents of ``path``; raise DocumentError on unreadable YAML."""
    try:
        with path.open("rb") as handle:
            # Read one byte past the limit: enough to know, never the whole of a huge file.
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read: {echo(str(exc))}") from None
    if len(data) > MAX_FILE_BYTES:
        raise DocumentError(f"{path}: file is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{path}: cannot read: not UTF-8 text (byte {exc.start})") from None
    return parse_documents(text, str(path))


def parse_documents(text: str, source: str) -> list[Document]:
    """All non-empty YAML documents of ``text``, loaded within ``bounded_yaml``'s limits."""
    if len(text) > MAX_FILE_BYTES:
        raise DocumentError(f"{source}: text is longer than {MAX_FILE_BYTES} characters")
    try:
        docs = load_all(text)
    except InputRefused as exc:
        mark = exc.mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise DocumentError(f"{source}{where}: {exc.path}: {exc.problem} ({exc.allowed})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = cap(str(exc.problem), ECHO_CHARS * 2)
        raise DocumentError(f"{source}{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise DocumentError(
            f"{source}: YAML syntax error: {cap(str(exc), ECHO_CHARS * 2)}"
        ) from None
    return [Document(source, i, d) for i, d in enumerate(docs) if d is not None]


def _identity_errors(doc: Mapping[str, Any]) -> list[FieldError]:
    errors = []
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if api_version != FULL_API_VERSION:
        got = "missing" if api_version is None else f"{echo(api_version)} is not supported"
        errors.append(FieldError("apiVersion", got, FULL_API_VERSION))
    if kind != KIND:
        got = "missing" if kind is None else f"{echo(kind)} is not an RLHFJob"
        errors.append(FieldError("kind", got, KIND))
    for key in doc:
        if key not in _TOP_LEVEL_FIELDS:
            errors.append(
                FieldError(
                    key_text(str(key)),
                    "unknown field",
                    "known fields: " + ", ".join(_TOP_LEVEL_FIELDS),
                )
            )
    return errors


def _at_most(errors: list[FieldError], limit: int) -> list[FieldError]:
    if len(errors) <= limit:
        return errors
    more = len(errors) - limit
    return [*errors[:limit], FieldError("(document)", f"{more} more problems not shown", "")]


def parse_rlhfjob(doc: object) -> RLHFJob:
    """Validate one manifest and return the typed job; raise ManifestError listing every error.

    Identity (apiVersion/kind) problems are reported alone: validating the spec of
    something that is not an RLHFJob would only add noise.
    """
    if not isinstance(doc, Mapping):
        kind = type(doc).__name__
        raise ManifestError([FieldError("(document)", f"is a {kind}", "a mapping (an RLHFJob)")])
    errors = _identity_errors(doc)
    if errors:
        raise ManifestError(_at_most(errors, MAX_ERRORS))
    meta = doc.get("metadata")
    errors = metadata_errors(meta)
    raw_spec = doc.get("spec")
    spec: RLHFJobSpec | None = None
    if not isinstance(raw_spec, Mapping):
        problem = "required object is missing" if raw_spec is None else "is not an object"
        errors.append(FieldError("spec", problem, "an object with models and dataset"))
    else:
        try:
            spec = RLHFJobSpec.model_validate(dict(raw_spec))
        except ValidationError as exc:
            errors.extend(field_errors(RLHFJobSpec, exc, prefix=("spec",)))
    if errors or spec is None:
        raise ManifestError(_at_most(errors, MAX_ERRORS))
    assert isinstance(meta, Mapping)
    return RLHFJob(
        name=str(meta["name"]),
        namespace=str(meta.get("namespace") or ""),
        spec=spec,
        metadata=dict(meta),
    )


def load_rlhfjob(path: Path) -> RLHFJob:
    """The single RLHFJob in ``path`` (local mode); errors name the file."""
    docs = load_documents(path)
    if len(docs) != 1:
        raise DocumentError(f"{path}: expected exactly one RLHFJob document, found {len(docs)}")
    return parse_rlhfjob(docs[0].content)
