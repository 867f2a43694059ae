"""What the operator needs to know about one worker pod, condensed from its API object.

Where it sits: the kopf pod index (``handlers.pods_by_job``) stores a :class:`PodView` per pod;
the reconcile logic (``status.reconcile``) decides from these views alone. Condensing early
keeps the index small and makes the status logic testable with plain dataclasses. ``detail``
is the human sentence that ends up in events and conditions: why a pod is not running, or why
it failed (the container's exit reason and code, an eviction, an unschedulable pod).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rlhfspec_operator.fetch_init import FETCH_WAITING, fetch_state
from rlhfspec_operator.naming import LABEL_INDEX, LABEL_JOB, LABEL_ROLE

PENDING = "Pending"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"


@dataclass(frozen=True)
class PodView:
    """One pod of a job as the status logic sees it."""

    name: str
    job: str
    role: str
    index: int
    uid: str = ""
    owner_uid: str | None = None
    phase: str = PENDING
    ready: bool = False
    deleting: bool = False
    detail: str = ""
    """Why the pod is not running, or why it failed; empty when it runs fine."""
    fetch: str = FETCH_WAITING
    """Its fetch init container: waiting (or none), running, done or failed."""
    fetch_message: str = ""
    """Why the fetch failed (the URIs and HTTP statuses), when it did."""
    gated: bool = False
    """Held by a scheduling gate (Kueue's admission): queued, not failing to start."""

    @property
    def running(self) -> bool:
        return self.phase == RUNNING and self.ready and not self.deleting

    @property
    def active(self) -> bool:
        """Still holds (or waits for) a node's resources."""
        return self.phase in (PENDING, RUNNING, "Unknown") and not self.deleting

    def describe(self) -> str:
        """``name: Phase (detail)`` for messages."""
        return f"{self.name}: {self.phase}" + (f" ({self.detail})" if self.detail else "")


def _controller_uid(meta: Mapping[str, Any]) -> str | None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def _container_details(status: Mapping[str, Any]) -> list[str]:
    details = []
    statuses = list(status.get("initContainerStatuses") or [])
    statuses += list(status.get("containerStatuses") or [])
    for container in statuses:
        name = container.get("name", "?")
        state = container.get("state") or {}
        if "terminated" in state:
            term = state["terminated"] or {}
            code = term.get("exitCode")
            if code == 0:
                continue
            text = f"container {name} terminated: {term.get('reason') or 'Error'}"
            text += f" (exit code {code})" if code is not None else ""
            if term.get("message"):
                text += f": {str(term['message']).strip()}"
            details.append(text)
        elif "waiting" in state and (state["waiting"] or {}).get("reason"):
            wait = state["waiting"]
            text = f"container {name} waiting: {wait['reason']}"
            if wait.get("message"):
                text += f": {str(wait['message']).strip()}"
            details.append(text)
    return details


def pod_view(body: Mapping[str, Any]) -> PodView:
    """Condense a Pod object (as the API returns it) into a :class:`PodView`."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = body.get("status") or {}
    phase = str(status.get("phase") or PENDING)
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready_condition = conditions.get("Ready")
    # Pods without a Ready condition yet count as ready once Running (no probes are set).
    ready = phase == RUNNING and (
        ready_condition is None or ready_condition.get("status") == "True"
    )
    details = []
    if status.get("reason"):
        details.append(f"{status['reason']}: {status.get('message', '')}".rstrip(": "))
    details += _container_details(status)
    scheduled = conditions.get("PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        reason = scheduled.get("reason") or "Unschedulable"
        details.append(f"{reason}: {scheduled.get('message', '')}".rstrip(": "))
    try:
        index = int(labels.get(LABEL_INDEX, 0))
    except ValueError:
        index = 0
    fetch, fetch_message = fetch_state(status)
    gated = bool((body.get("spec") or {}).get("schedulingGates")) or (
        scheduled is not None and scheduled.get("reason") == "SchedulingGated"
    )
    return PodView(
        name=str(meta.get("name", "")),
        job=str(labels.get(LABEL_JOB, "")),
        role=str(labels.get(LABEL_ROLE, "")),
        index=index,
        uid=str(meta.get("uid", "")),
        owner_uid=_controller_uid(meta),
        phase=phase,
        ready=ready,
        deleting=bool(meta.get("deletionTimestamp")),
        detail="; ".join(details),
        fetch=fetch,
        fetch_message=fetch_message,
        gated=gated,
    )
