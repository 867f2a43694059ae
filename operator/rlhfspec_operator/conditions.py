"""Kubernetes-style conditions and RFC 3339 times on the RLHFJob status (pure helpers).

Where it sits: used by ``status`` (phase machine) and ``progress`` (CoordinatorReachable).
``lastTransitionTime`` follows the API conventions: it moves only when a condition's status
changes, which is what lets ``status`` measure how long the job has been starting.
"""

from __future__ import annotations

import datetime

from rlhfspec_api.echo import cap
from rlhfspec_api.status import Condition, ConditionStatus, RLHFJobStatus


def timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def condition(status: RLHFJobStatus, kind: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == kind), None)


def set_condition(
    status: RLHFJobStatus,
    kind: str,
    value: ConditionStatus,
    reason: str,
    message: str,
    now: datetime.datetime,
    generation: int | None,
) -> None:
    """Upsert a condition; ``lastTransitionTime`` moves only when its status changes."""
    old = condition(status, kind)
    moved = old is None or old.status != value
    new = Condition(
        type=kind,
        status=value,
        reason=reason,
        message=cap(message),  # every condition message, whatever its source, stays small
        last_transition_time=timestamp(now) if moved or old is None else old.last_transition_time,
        observed_generation=generation,
    )
    status.conditions = [c for c in status.conditions if c.type != kind] + [new]
