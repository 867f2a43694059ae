"""Pure: a job whose pods a queue holds (Kueue's admission gate) is queued, not starting late.

Where it sits: ``status.reconcile`` calls :func:`apply_queue` each tick with the pods the job
still waits for, and measures ``startupDeadlineSeconds`` from :func:`admitted_since` too. Kueue's
plain-pod integration holds every pod of a gang with a scheduling gate until the queue admits
the whole group (``overrides`` labels the pods for it); that wait can take hours and is not a
pod failing to start. While every pod the job waits for is gated, the job stays Initializing
with the ``Queued`` condition True and no startup deadline; once the gates go, the condition
turns False and the startup deadline counts from that moment, as from a resume.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from rlhfspec_api.status import ConditionStatus, ConditionType, RLHFJobStatus
from rlhfspec_operator.conditions import condition, parse_time, set_condition
from rlhfspec_operator.pods import PodView


def apply_queue(
    status: RLHFJobStatus,
    waiting: Sequence[PodView | None],
    now: datetime.datetime,
    generation: int | None,
) -> bool:
    """Set the ``Queued`` condition from the pods the job waits for (None: not created yet);
    True while every one of them is held by a scheduling gate."""
    held = bool(waiting) and all(view is not None and view.gated for view in waiting)
    before = condition(status, ConditionType.QUEUED)
    if held:
        message = (
            f"{len(waiting)} worker pod(s) held by a scheduling gate until the queue admits the "
            "job (kueue.x-k8s.io/queue-name); startupDeadlineSeconds counts from admission"
        )
        set_condition(
            status,
            ConditionType.QUEUED,
            ConditionStatus.TRUE,
            "WaitingForAdmission",
            message,
            now,
            generation,
        )
    elif before is not None and before.status is ConditionStatus.TRUE:
        message = "the queue admitted the job: its pods' scheduling gates are gone"
        set_condition(
            status,
            ConditionType.QUEUED,
            ConditionStatus.FALSE,
            "Admitted",
            message,
            now,
            generation,
        )
    return held


def admitted_since(status: RLHFJobStatus) -> datetime.datetime | None:
    """When the queue last admitted the job (its pods' gates went), if it was ever queued."""
    queued = condition(status, ConditionType.QUEUED)
    if queued is None or queued.status is not ConditionStatus.FALSE:
        return None
    return parse_time(queued.last_transition_time)
