"""Checks of an RLHFJob's ``metadata``: the job's name, namespace, labels and annotations.

Where it sits: ``manifest.parse_rlhfjob`` calls :func:`metadata_errors` before it validates
the spec; the operator hands it the metadata the API server stored, so fields the server
sets (uid, resourceVersion, managedFields ...) must pass. The rule is the API server's:
every ObjectMeta field is accepted and nothing else (a misspelt ``lables`` is an error, not
a silently dropped label). The fields a user writes and the operator reads are checked for
type and format; the content of the server-set ones is not ours to judge.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from rlhfspec_api import formats
from rlhfspec_api.echo import echo, key_text
from rlhfspec_api.errors import FieldError

# Child objects are named <job>-<role>[-<index>] and Services must be DNS-1035 labels
# (<= 63 characters, starting with a letter): 40 leaves room for the longest suffix.
MAX_NAME_LENGTH = 40
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""A DNS-1035 label (Service names derive from the job's name), as the CRD states it."""
_DNS1035 = re.compile(JOB_NAME_PATTERN.strip("^$"))
NAME_ALLOWED = (
    f"lowercase letters, digits and '-', starting with a letter, at most "
    f"{MAX_NAME_LENGTH} characters"
)

OBJECT_META_FIELDS = (
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "finalizers",
    "managedFields",
    "selfLink",
)
"""Every field of Kubernetes' ObjectMeta; the last ten are set by the API server."""

MAX_ANNOTATIONS_BYTES = 256 * 1024
"""Kubernetes' limit on all annotation keys and values of one object together."""


def _name_errors(name: object) -> list[FieldError]:
    if name is None:
        return [FieldError("metadata.name", "required field is missing", NAME_ALLOWED)]
    # fullmatch: "tiny-grpo\n" must not pass as "tiny-grpo" ($ matches before a newline).
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not _DNS1035.fullmatch(name):
        return [FieldError("metadata.name", f"{echo(name)} is not a valid job name", NAME_ALLOWED)]
    return []


def _string_map_errors(field: str, value: object) -> list[FieldError]:
    path = f"metadata.{field}"
    if not isinstance(value, Mapping):
        return [FieldError(path, f"{echo(value)} is not a mapping", "a mapping of strings")]
    errors: list[FieldError] = []
    total = 0
    for key, item in value.items():
        where = f"{path}.{key_text(str(key))}"
        if not isinstance(key, str) or formats.label_key(key) is not None:
            errors.append(
                FieldError(
                    where,
                    f"key {echo(key)} is not a valid key",
                    "[prefix/]name: a DNS subdomain prefix, a name of at most 63 letters, "
                    "digits, '-', '_' and '.' starting and ending alphanumeric",
                )
            )
            continue
        if not isinstance(item, str):
            errors.append(FieldError(where, f"{echo(item)} is not a string", "a string"))
            continue
        total += len(key.encode()) + len(item.encode())
        if field == "labels" and (problem := formats.label_value(item)) is not None:
            errors.append(
                FieldError(
                    where,
                    f"{echo(item)} {problem}",
                    "empty, or at most 63 letters, digits, '-', '_' and '.' starting and "
                    "ending alphanumeric",
                )
            )
    if field == "annotations" and total > MAX_ANNOTATIONS_BYTES:
        errors.append(
            FieldError(
                path,
                f"annotations take {total} bytes",
                f"at most {MAX_ANNOTATIONS_BYTES} bytes of keys and values together",
            )
        )
    return errors


def metadata_errors(meta: object) -> list[FieldError]:
    """Every problem of ``meta`` (the manifest's ``metadata``), one FieldError each."""
    if not isinstance(meta, Mapping):
        return [FieldError("metadata", "required object is missing", "an object with name")]
    errors = _name_errors(meta.get("name"))
    for key in meta:
        if key not in OBJECT_META_FIELDS:
            errors.append(
                FieldError(
                    f"metadata.{key_text(str(key))}",
                    "unknown field",
                    "ObjectMeta fields: " + ", ".join(OBJECT_META_FIELDS[:5]) + " (and those "
                    "the API server sets)",
                )
            )
    namespace = meta.get("namespace")
    if namespace is not None and (
        not isinstance(namespace, str) or formats.dns_label(namespace) is not None
    ):
        errors.append(
            FieldError(
                "metadata.namespace",
                f"{echo(namespace)} is not a valid namespace",
                "a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and "
                "ending alphanumeric",
            )
        )
    generate_name = meta.get("generateName")
    if generate_name is not None and not isinstance(generate_name, str):
        errors.append(
            FieldError(
                "metadata.generateName", f"{echo(generate_name)} is not a string", "a string"
            )
        )
    for field in ("labels", "annotations"):
        if meta.get(field) is not None:
            errors.extend(_string_map_errors(field, meta[field]))
    return errors
