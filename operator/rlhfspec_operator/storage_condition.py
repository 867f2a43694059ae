"""Pure: the trainer's StorageFull report -> the RLHFJob's ``StorageFull`` condition.

Where it sits: ``redis_progress`` reads ``Keys.storage_full`` with the progress key into the
:class:`~rlhfspec_operator.progress.ProgressRead`; ``status.reconcile`` calls
:func:`apply_storage` each tick. A full disk is a condition the user can act on (free space,
grow the volume), not a crash loop: the trainer keeps retrying and the job stays Running, with
``StorageFull=True`` naming the path and the bytes needed and free until a write succeeds.
"""

from __future__ import annotations

import datetime

from rlhfspec_api.status import ConditionStatus, ConditionType, RLHFJobStatus
from rlhfspec_operator.conditions import condition, set_condition
from rlhfspec_operator.progress import ProgressRead


def apply_storage(
    status: RLHFJobStatus,
    read: ProgressRead,
    now: datetime.datetime,
    generation: int | None,
) -> list[tuple[str, str, str]]:
    """Set or clear StorageFull; return events as (type, reason, message). A read that
    failed changes nothing (Redis unreachable says nothing about the disk)."""
    if not read.attempted or read.error is not None:
        return []
    before = condition(status, ConditionType.STORAGE_FULL)
    was_full = before is not None and before.status is ConditionStatus.TRUE
    report = read.storage_full
    if report is not None:
        full = ConditionType.STORAGE_FULL
        set_condition(status, full, ConditionStatus.TRUE, full, report.message, now, generation)
        return [] if was_full else [("Warning", ConditionType.STORAGE_FULL, report.message)]
    if not was_full:
        return []
    message = "the trainer's writes to the job's storage succeed again"
    set_condition(
        status,
        ConditionType.STORAGE_FULL,
        ConditionStatus.FALSE,
        "StorageAvailable",
        message,
        now,
        generation,
    )
    return [("Normal", "StorageAvailable", message)]
