"""``spec.ttlSecondsAfterFinished``: delete a finished job's children, and optionally the job.

Where it sits: the ``expire`` timer of ``handlers`` runs while a job is Succeeded or Failed,
has a TTL and has not been cleaned up yet. It asks :func:`seconds_left`; at zero it calls
:func:`delete_children` and then either deletes the RLHFJob (``spec.ttlDeletesJob``) or marks
it with the ``ChildrenDeleted`` condition, which ends the timer. The clock starts at
``status.completionTime``.

What goes: every object the operator creates for the job (worker pods, including the
finished coordinator and a failed pod kept for its logs; the role Services; the config
ConfigMap; the KV and managed Redis Secrets; the Redis Deployment, Service and NetworkPolicy;
the worker NetworkPolicy; the claim the job created for ``storage.size``, with its
checkpoints). A claim the user named (``storage.claimName``) is never the job's and stays. An
object is deleted only when its controller reference is this job's (by uid): a name someone
else holds is never touched. Deletion is by name, so it needs no list permission.
"""

from __future__ import annotations

import datetime
from typing import Any

from rlhfspec_api import API_GROUP, API_VERSION
from rlhfspec_api.crd import PLURAL
from rlhfspec_api.manifest import RLHFJob
from rlhfspec_api.status import TERMINAL_PHASES, ConditionStatus, ConditionType, RLHFJobStatus
from rlhfspec_operator.conditions import condition, parse_time, set_condition
from rlhfspec_operator.kube import ApiError, Kube, ownership
from rlhfspec_operator.naming import Owner
from rlhfspec_operator.plan import creation_plan

TTL_REASON = "TTLExpired"


def seconds_left(ttl: int | None, status: RLHFJobStatus, now: datetime.datetime) -> float | None:
    """Seconds until the job's children are due for deletion (<= 0: now); None when the job
    has no TTL, is not finished, or its children are gone already."""
    if ttl is None or status.phase not in TERMINAL_PHASES or cleaned_up(status):
        return None
    finished = parse_time(status.completion_time)
    if finished is None:
        return 0.0  # finished without a recorded time (an older status): due now
    return ttl - (now - finished).total_seconds()


def cleaned_up(status: RLHFJobStatus) -> bool:
    done = condition(status, ConditionType.CHILDREN_DELETED)
    return done is not None and done.status is ConditionStatus.TRUE


def mark_cleaned_up(
    status: RLHFJobStatus, deleted: list[str], now: datetime.datetime, generation: int | None
) -> RLHFJobStatus:
    """The status with :data:`ConditionType.CHILDREN_DELETED` set, naming how many objects went."""
    marked = status.model_copy(deep=True)
    message = f"ttlSecondsAfterFinished passed: deleted {len(deleted)} child object(s)"
    set_condition(
        marked,
        ConditionType.CHILDREN_DELETED,
        ConditionStatus.TRUE,
        TTL_REASON,
        message,
        now,
        generation,
    )
    return marked


def owned_children(job: RLHFJob, owner: Owner) -> list[dict[str, Any]]:
    """Every object the operator may have created for ``job``, pods first (they free the
    accelerators and hold the rest: mounts, Secrets)."""
    # The create handler's own list (a child added there is deleted here too). Only names,
    # kinds and owner references are read: the password and key are placeholders.
    created = creation_plan(
        job,
        owner,
        password="-",
        operator_namespace=None,
        metrics_from=[],
        with_pods=True,
        kv_key="-",
    )
    pods = [obj for obj in created if obj["kind"] == "Pod"]
    return pods + [obj for obj in created if obj["kind"] != "Pod"]


async def delete_children(kube: Kube, job: RLHFJob, owner: Owner) -> list[str]:
    """Delete the children the job controls; ``Kind name`` of each one deleted."""
    deleted = []
    for wanted in owned_children(job, owner):
        kind, meta = wanted["kind"], wanted["metadata"]
        args = (wanted["apiVersion"], kind, meta["namespace"], meta["name"])
        existing = await kube.get(*args)
        if existing is None or ownership(existing, wanted) != "mine":
            continue
        if await kube.delete(*args):
            deleted.append(f"{kind} {meta['name']}")
    return deleted


async def delete_job(kube: Kube, owner: Owner) -> bool:
    """Delete the RLHFJob itself (only this incarnation: the uid is a precondition)."""
    path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{owner.namespace}/{PLURAL}/{owner.name}"
    body = {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "propagationPolicy": "Background",
        "preconditions": {"uid": owner.uid},
    }
    try:
        await kube.request("DELETE", path, body)
    except ApiError as exc:
        if exc.status in (404, 409):  # gone already, or a new job of the same name
            return False
        raise
    return True
