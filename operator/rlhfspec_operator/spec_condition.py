"""Pure: the SpecAccepted condition, which says whether the operator took the latest spec change.

Where it sits: the reconcile timer (``handlers.reconcile``) calls :func:`track` on every tick
with what it found refused in the live spec: an invalid value such as
``generation.replicas: 0`` written past the CRD's schema, or a change to a field that cannot
change while the job exists (``updates.refused_changes``). Such a change keeps the job running
on its last accepted spec; the update handler posts the ``UpdateRejected`` event once, and this
condition names the field for as long as the live spec holds it, after the event has expired.
The timer is the condition's only writer: a second writer (the update handler) raced the
timer's own status patch, which carries the whole conditions list.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from rlhfspec_api.status import ConditionStatus, ConditionType, RLHFJobStatus
from rlhfspec_operator.conditions import condition, set_condition

ACCEPTED = "Accepted"
UPDATE_REJECTED = "UpdateRejected"


def spec_accepted(
    status: RLHFJobStatus,
    rejected: Sequence[str],
    now: datetime.datetime,
    generation: int | None,
) -> RLHFJobStatus:
    """A copy of ``status`` with SpecAccepted: False naming what was refused (``rejected``:
    one sentence per refused field), True when nothing was."""
    new = status.model_copy(deep=True)
    if rejected:
        set_condition(
            new,
            ConditionType.SPEC_ACCEPTED,
            ConditionStatus.FALSE,
            UPDATE_REJECTED,
            "; ".join(rejected),
            now,
            generation,
        )
    else:
        set_condition(
            new,
            ConditionType.SPEC_ACCEPTED,
            ConditionStatus.TRUE,
            ACCEPTED,
            "the latest spec change was accepted",
            now,
            generation,
        )
    return new


def track(
    status: RLHFJobStatus,
    refused: Sequence[str],
    now: datetime.datetime,
    generation: int | None,
) -> RLHFJobStatus:
    """SpecAccepted for this tick: False while something is refused; True once it no longer is
    (absent on a job that never had a change refused: nothing to say)."""
    if refused or condition(status, ConditionType.SPEC_ACCEPTED) is not None:
        return spec_accepted(status, refused, now, generation)
    return status
