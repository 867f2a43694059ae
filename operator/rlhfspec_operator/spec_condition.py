"""Pure: the SpecAccepted condition, which says whether the operator took the latest spec change.

Where it sits: the update handler (``handlers.update``) calls :func:`spec_accepted` after it
parsed a changed spec. A change the operator refuses (an invalid value such as
``generation.replicas: 0`` written past the CRD's schema, or a field that cannot change while
the job exists) keeps the job running on its last accepted spec; the refusal is an event
(``UpdateRejected``) and this condition, so ``kubectl describe`` and ``kubectl get -o yaml``
name the field after the event has expired. An accepted change sets it back to True.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from rlhfspec_api.status import ConditionStatus, RLHFJobStatus
from rlhfspec_operator.conditions import set_condition

SPEC_ACCEPTED = "SpecAccepted"
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
            SPEC_ACCEPTED,
            ConditionStatus.FALSE,
            UPDATE_REJECTED,
            "; ".join(rejected),
            now,
            generation,
        )
    else:
        set_condition(
            new,
            SPEC_ACCEPTED,
            ConditionStatus.TRUE,
            ACCEPTED,
            "the latest spec change was accepted",
            now,
            generation,
        )
    return new
