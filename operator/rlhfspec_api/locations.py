"""Where a job may read its models and datasets from: the fields that hold locations and the
rules every location obeys (pure, no filesystem).

Where it sits: the operator refuses a job whose locations break these rules before any pod
exists (``rlhfspec_operator.admission``); worker preflight (``rlhfspec_workers.preflight``)
applies the same rules, then resolves the location on the pod and checks again after symlinks.
``pvc://`` means "under the job's storage": an absolute path or a ``..`` would leave the
volume. On a cluster the pod's own filesystem (a bare path or ``file://``) is not a source:
the pod runs with mounts (config, reward modules, scratch) a job author should not read from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath

from rlhfspec_api.generation import MODEL_BASED_DRAFTERS, SpeculativeMode
from rlhfspec_api.spec import RLHFJobSpec

PVC_ALLOWED = "pvc://<relative path under the job's storage>, without '..' or a leading '/'"
CLUSTER_ALLOWED = "on a cluster: pvc://<path under the job's storage>, tiny:// or zoo://"
LOCAL_SCHEMES = ("", "file")
"""A bare path and ``file://``: this machine's (or this pod's) own filesystem."""


def split(location: str) -> tuple[str, str]:
    """``pvc://a/b`` -> ``("pvc", "a/b")``; a bare path -> ``("", path)``."""
    scheme, sep, rest = location.partition("://")
    return (scheme, rest) if sep else ("", location)


def model_locations(spec: RLHFJobSpec) -> Iterator[tuple[str, str]]:
    """(field path, location) of every model the job loads."""
    models = spec.models
    for name in ("policy", "reference", "critic", "reward"):
        ref = getattr(models, name)
        if ref is not None:
            yield f"spec.models.{name}.path", ref.path
    if spec.generation.speculative.mode is not SpeculativeMode.OFF:
        for index, drafter in enumerate(spec.generation.speculative.drafters):
            if drafter.method in MODEL_BASED_DRAFTERS and drafter.model is not None:
                field = f"spec.generation.speculative.drafters[{index}].model.path"
                yield field, drafter.model.path


def locations(spec: RLHFJobSpec) -> Iterator[tuple[str, str]]:
    """(field path, location) of every model and dataset file the job reads."""
    yield from model_locations(spec)
    yield "spec.dataset.path", spec.dataset.path
    if spec.dataset.eval is not None:
        yield "spec.dataset.eval", spec.dataset.eval


def location_problem(location: str, *, cluster: bool) -> tuple[str, str] | None:
    """(what is wrong, what is allowed) when ``location`` breaks a rule; None when it is fine."""
    scheme, rest = split(location)
    if scheme == "pvc":
        parts = PurePosixPath(rest).parts
        if rest.startswith("/") or ".." in parts:
            return f"{location!r} leaves the job's storage", PVC_ALLOWED
    if cluster and scheme in LOCAL_SCHEMES:
        return (
            f"{location!r} is a path on the pod's own filesystem, which a cluster job may not "
            "read models or data from",
            CLUSTER_ALLOWED,
        )
    return None
