"""Pure: copy the coordinator's ``JobProgress`` into the RLHFJob status.

Where it sits: ``redis_progress.read_progress`` fetches a :class:`ProgressRead` (the message,
or why it could not be read); ``status.reconcile`` calls :func:`apply_progress` on every
tick. Numbers a user sees in ``kubectl get rlhfjobs`` (Iter, Strategy, Tok/s, Accept, Reward)
come from here; whether Redis answered becomes the CoordinatorReachable condition.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from rlhfspec_api.status import (
    Condition,
    ConditionStatus,
    ConditionType,
    GenerationStatus,
    RLHFJobStatus,
)
from rlhfspec_operator.conditions import set_condition, timestamp
from rlhfspec_workers.messages import JobProgress, StorageFull


@dataclass(frozen=True)
class ProgressRead:
    """The outcome of one read of the coordinator's progress key."""

    progress: JobProgress | None = None
    error: str | None = None
    """Why Redis could not be read (or its payload not decoded); None on success."""
    error_reason: str = "RedisUnavailable"
    """CamelCase reason of ``error``: RedisUnavailable, InvalidProgress, AuthenticationFailed
    (Redis refused the password) or CredentialsUnusable (the policy or the Secret forbids it)."""
    attempted: bool = False
    """False when nothing was read (no status change about reachability)."""
    storage_full: StorageFull | None = None
    """The trainer's report of a write refused for lack of room (``Keys.storage_full``)."""


def apply_progress(
    status: RLHFJobStatus,
    read: ProgressRead,
    default_total: int,
    now: datetime.datetime,
    generation: int | None,
    reachable_before: Condition | None,
) -> list[tuple[str, str, str]]:
    """Update metrics and CoordinatorReachable; return events as (type, reason, message)."""
    if not read.attempted:
        return []
    was_unreachable = (
        reachable_before is not None and reachable_before.status is ConditionStatus.FALSE
    )
    if read.error is not None:
        set_condition(
            status,
            ConditionType.COORDINATOR_REACHABLE,
            ConditionStatus.FALSE,
            read.error_reason,
            read.error,
            now,
            generation,
        )
        if was_unreachable:
            return []
        return [("Warning", "CoordinatorUnreachable", f"cannot read progress: {read.error}")]
    events = []
    if was_unreachable:
        events.append(("Normal", "CoordinatorReachable", "the coordinator's Redis answers again"))
    progress = read.progress
    message = "no progress reported yet"
    if progress is not None:
        # The coordinator's own timestamp, not an age: the status changes only with progress.
        message = f"progress {progress.state}"
        if progress.updated_at:
            written = datetime.datetime.fromtimestamp(progress.updated_at, datetime.UTC)
            message += f", written at {timestamp(written)}"
    set_condition(
        status,
        ConditionType.COORDINATOR_REACHABLE,
        ConditionStatus.TRUE,
        "Connected",
        message,
        now,
        generation,
    )
    if progress is None:
        return events
    total = progress.total_iterations or default_total
    status.iteration = progress.iteration
    status.total_iterations = total
    status.progress = f"{progress.iteration}/{total}"
    # Rounded: these are what `kubectl get` prints (a column of 17-digit floats helps nobody).
    status.generation = GenerationStatus(
        tokens_per_second=_round(progress.tokens_per_second, 1),
        mean_accepted_length=_round(progress.mean_accepted_length, 2),
        strategy=progress.strategy,
        strategy_table_version=progress.strategy_table_version,
        migrations=progress.migrations,
        weight_version=progress.weight_version,
    )
    status.reward_mean = _round(progress.reward_mean, 4)
    status.kl = _round(progress.kl, 5)
    status.eval_accuracy = _round(progress.eval_accuracy, 4)
    return events


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
