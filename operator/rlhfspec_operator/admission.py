"""Pure admission: what a valid RLHFJob may still not ask of this cluster.

Where it sits: the create/resume handler (``handlers.start``) calls :func:`spec_errors` and
:func:`policy_errors` after parsing and before creating any child, and
:func:`password_secret_errors` once it has read an external password Secret. A job that fails
here is Failed with a condition naming the field; nothing is created.

Why it exists: the operator acts with its own service account. Creating an RLHFJob runs pods
with the job's images (``allowedImages`` limits which), makes the operator open connections to
the job's Redis URL (``allowedRedisHosts``: otherwise any host the operator can reach) and send
it the password it reads from a Secret the job names (the Secret must carry
:data:`SECRET_OPT_IN_LABEL`: a Secret the job's author could not read must not be disclosed by
naming it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from rlhfspec_api import API_GROUP
from rlhfspec_api.errors import FieldError
from rlhfspec_api.locations import location_problem, locations
from rlhfspec_api.manifest import RLHFJob
from rlhfspec_api.spec import CoordinatorMode
from rlhfspec_operator import builders

SECRET_OPT_IN_LABEL = f"{API_GROUP}/coordinator-password"
"""A Secret named by ``spec.coordinator.passwordSecret`` must carry this label (value "true"):
whoever labels it says the operator may send it to a job's Redis."""
POLICY_REASON = "NotAllowed"
"""Condition reason of a job the cluster's policy refuses (the spec itself is valid)."""


def spec_errors(job: RLHFJob) -> list[FieldError]:
    """Valid for ``rlhfspec run`` but not on a cluster: a local storage path, locations on the
    pod's own filesystem or outside the job's storage."""
    errors = builders.cluster_errors(job)
    for field, location in locations(job.spec):
        problem = location_problem(location, cluster=True)
        if problem is not None:
            errors.append(FieldError(field, *problem))
    return errors


def job_images(job: RLHFJob) -> list[tuple[str, str]]:
    """(field path, image) of every container image the operator would run for the job."""
    images = [("spec.image", job.spec.image)]
    if job.spec.coordinator.mode is CoordinatorMode.MANAGED:
        images.append(("spec.coordinator.redisImage", job.spec.coordinator.redis_image))
    return images


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def _listing(patterns: Sequence[str]) -> str:
    return ", ".join(patterns) if patterns else "none"


def policy_errors(
    job: RLHFJob, *, allowed_images: Sequence[str], allowed_redis_hosts: Sequence[str]
) -> list[FieldError]:
    """Images outside ``allowed_images`` (empty: any), an external Redis host outside
    ``allowed_redis_hosts`` (empty: external mode is refused)."""
    errors = []
    if allowed_images:
        for field, image in job_images(job):
            if not _matches(image, allowed_images):
                errors.append(
                    FieldError(
                        field,
                        f"image {image!r} is not allowed on this cluster",
                        f"images matching {_listing(allowed_images)}; set by the cluster's "
                        "administrator in the chart's allowedImages",
                    )
                )
    coordinator = job.spec.coordinator
    if coordinator.mode is CoordinatorMode.EXTERNAL and coordinator.url is not None:
        host = (urlsplit(coordinator.url).hostname or "").lower()
        if not _matches(host, [p.lower() for p in allowed_redis_hosts]):
            errors.append(
                FieldError(
                    "spec.coordinator.url",
                    f"host {host!r} is not a Redis host the operator may connect to",
                    f"hosts matching {_listing(allowed_redis_hosts)}; set by the cluster's "
                    "administrator in the chart's coordinator.allowedHosts, or use managed mode",
                )
            )
    return errors


def password_secret_errors(job: RLHFJob, secret: Mapping[str, Any] | None) -> list[FieldError]:
    """The external password Secret exists, opted in, and holds the key (``secret``: as read)."""
    ref = job.spec.coordinator.password_secret
    if ref is None or job.spec.coordinator.mode is not CoordinatorMode.EXTERNAL:
        return []
    field = "spec.coordinator.passwordSecret"
    if secret is None:
        return [FieldError(f"{field}.name", f"Secret {ref.name!r} not found", "an existing Secret")]
    labels = (secret.get("metadata") or {}).get("labels") or {}
    if labels.get(SECRET_OPT_IN_LABEL) != "true":
        return [
            FieldError(
                f"{field}.name",
                f"Secret {ref.name!r} does not carry the label {SECRET_OPT_IN_LABEL}=true, so the "
                "operator will not read it nor send it to the job's Redis",
                f"a Secret whose owner labelled it {SECRET_OPT_IN_LABEL}=true",
            )
        ]
    data = {**(secret.get("stringData") or {}), **(secret.get("data") or {})}
    if ref.key not in data:
        return [
            FieldError(
                f"{field}.key",
                f"Secret {ref.name!r} has no key {ref.key!r}",
                "a key of that Secret (passwordSecret.key, default password)",
            )
        ]
    return []
