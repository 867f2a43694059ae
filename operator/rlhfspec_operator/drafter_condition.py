"""Pure: the coordinator's collapsed drafters -> the RLHFJob's ``DrafterCollapsed`` condition.

Where it sits: the coordinator's ``StrategyBroadcaster`` pools every generation worker's
acceptance per drafter and flags a drafter whose mean accepted length fell to ~1 (typical of
a stale draft model after a policy weight sync); the coordinator writes those drafters into
``JobProgress.collapsed_drafters``, ``redis_progress`` reads it into the
:class:`~rlhfspec_operator.progress.ProgressRead`, and ``status.reconcile`` calls
:func:`apply_drafters` each tick. A collapsed drafter is not a failure (the selector stops
using it and the job keeps training, just slower), so it is a condition the user can act on:
``DrafterCollapsed=True`` names each drafter and its mean accepted length until none is
collapsed; a job whose drafters never collapsed carries no such condition.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from rlhfspec_api.generation import DrafterMethod
from rlhfspec_api.status import ConditionStatus, ConditionType, RLHFJobStatus
from rlhfspec_operator.conditions import condition, set_condition
from rlhfspec_operator.progress import ProgressRead

RECOVERED = "DraftersAccepting"


def collapsed_message(drafters: Mapping[str, float]) -> str:
    """What ``kubectl describe`` shows: each drafter with its mean accepted length, then what
    happens and what the user can do about it."""
    named = ", ".join(
        f"{name} (mean accepted length {mean:.2f})" for name, mean in sorted(drafters.items())
    )
    if len(drafters) == 1:
        message = (
            f"drafter {named} collapsed: its drafts are rarely accepted, so the selector "
            "stops using it until it recovers"
        )
    else:
        message = (
            f"drafters {named} collapsed: their drafts are rarely accepted, so the selector "
            "stops using them until they recover"
        )
    if DrafterMethod.DRAFT_MODEL.value in drafters:
        # The usual cause: RL moved the policy away from a draft model that stayed as loaded.
        message += (
            "; a draft_model drafter goes stale as the policy trains: keep it fresh with "
            "refresh: {every: 1} (or onAcceptanceBelow) on the drafter"
        )
    return message


def apply_drafters(
    status: RLHFJobStatus,
    read: ProgressRead,
    now: datetime.datetime,
    generation: int | None,
) -> list[tuple[str, str, str]]:
    """Set or clear DrafterCollapsed; return events as (type, reason, message). A read that
    failed, or found no progress yet, changes nothing (it says nothing about the drafters)."""
    if not read.attempted or read.error is not None or read.progress is None:
        return []
    before = condition(status, ConditionType.DRAFTER_COLLAPSED)
    was_collapsed = before is not None and before.status is ConditionStatus.TRUE
    drafters = read.progress.collapsed_drafters
    kind = ConditionType.DRAFTER_COLLAPSED
    if drafters:
        message = collapsed_message(drafters)
        set_condition(status, kind, ConditionStatus.TRUE, kind, message, now, generation)
        # One Warning when it happens; a changed list or mean only updates the message.
        return [] if was_collapsed else [("Warning", kind, message)]
    if not was_collapsed:
        return []  # never collapsed (or already recovered): no condition to add or change
    message = "no drafter is collapsed: the selector may use every drafter again"
    set_condition(status, kind, ConditionStatus.FALSE, RECOVERED, message, now, generation)
    return [("Normal", RECOVERED, message)]
