"""Pure: which spec changes a running job accepts, and the spec the operator keeps using.

Where it sits: the create handler pins the applied spec in the annotation
``rlhfspec.io/applied-spec``; the update handler calls :func:`changed_fields` and
:func:`split_changes` to accept the mutable fields (suspend, replicas, limits) and reject the
rest with an event; the reconcile timer builds pods from :func:`effective_spec`, so a rejected
edit (a new image, a new learning rate) never leaks into pods recreated later while the
workers' ``job.yaml`` still says otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from rlhfspec_api import API_GROUP
from rlhfspec_api.manifest import RLHFJob
from rlhfspec_api.spec import RLHFJobSpec

APPLIED_SPEC_ANNOTATION = f"{API_GROUP}/applied-spec"
MUTABLE_FIELDS = (
    "suspend",
    "generation.replicas",
    "backoffLimit",
    "activeDeadlineSeconds",
    "startupDeadlineSeconds",
    # As for Kubernetes Jobs, a TTL may be set or changed at any time, also after the finish.
    "ttlSecondsAfterFinished",
    "ttlDeletesJob",
)
"""Wire paths (below ``spec``) a user may change while the job exists."""


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted wire paths whose values differ (lists compare whole), sorted."""
    before, after = _leaves(old), _leaves(new)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def refusal(rejected: list[str]) -> str:
    """Why changes to the ``rejected`` paths are not taken (an event and a condition say it)."""
    return (
        f"spec.{', spec.'.join(rejected)} cannot change while the job exists "
        f"(only {', '.join(MUTABLE_FIELDS)} can); delete and re-create the job"
    )


def refused_changes(pinned: Mapping[str, Any] | None, live: RLHFJobSpec) -> list[str]:
    """One sentence naming the live spec's changes the job does not take, or none: a refused
    change stays refused until the user reverts it (the pinned spec keeps the old value)."""
    if pinned is None:
        return []
    _, rejected = split_changes(changed_fields(pinned, live.to_wire()))
    return [refusal(rejected)] if rejected else []


def _is_mutable(path: str) -> bool:
    return any(path == f or path.startswith(f + ".") for f in MUTABLE_FIELDS)


def split_changes(paths: list[str]) -> tuple[list[str], list[str]]:
    """(accepted, rejected) paths."""
    return [p for p in paths if _is_mutable(p)], [p for p in paths if not _is_mutable(p)]


def _get(wire: Mapping[str, Any], path: str) -> Any:
    value: Any = wire
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _set(wire: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = wire
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value


def pinned_spec(annotations: Mapping[str, str]) -> dict[str, Any] | None:
    raw = annotations.get(APPLIED_SPEC_ANNOTATION)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def pin(spec: RLHFJobSpec) -> str:
    return json.dumps(spec.to_wire(), sort_keys=True, separators=(",", ":"))


def last_accepted(job: str, namespace: str, metadata: Mapping[str, Any]) -> RLHFJob | None:
    """The job as last accepted (its pinned spec), for a live spec that no longer parses (a
    change refused by the update handler): the job keeps running on it. None when nothing
    usable is pinned."""
    pinned = pinned_spec(metadata.get("annotations") or {})
    if pinned is None:
        return None
    try:
        spec = RLHFJobSpec.model_validate(pinned)
    except ValidationError:
        return None
    return RLHFJob(job, namespace, spec, dict(metadata))


def effective_spec(live: RLHFJobSpec, pinned: Mapping[str, Any] | None) -> RLHFJobSpec:
    """The pinned spec with the live values of the mutable fields (live if nothing pinned)."""
    if pinned is None:
        return live
    wire = json.loads(json.dumps(pinned))
    live_wire = live.to_wire()
    for path in MUTABLE_FIELDS:
        _set(wire, path, _get(live_wire, path))
    try:
        return RLHFJobSpec.model_validate(wire)
    except ValidationError:
        return live  # a pin from an older contract version: the live spec is all we have
