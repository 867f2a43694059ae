"""The state machine's vocabulary: what it observes, what it plans, and its two transitions.

Where it sits: ``status.reconcile`` (and the pod rules in ``pod_rules``) turn an
:class:`Observation` into a :class:`Plan`; every phase change goes through :func:`enter`,
every terminal one through :func:`finish`. Pure: no API calls, no clock.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

from rlhfspec_api.echo import cap
from rlhfspec_api.manifest import RLHFJob
from rlhfspec_api.status import ConditionStatus, ConditionType, Phase, RLHFJobStatus
from rlhfspec_operator.conditions import set_condition, timestamp
from rlhfspec_operator.pods import PodView
from rlhfspec_operator.progress import ProgressRead

NORMAL = "Normal"
WARNING = "Warning"


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the job."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Observation:
    job: RLHFJob
    generation: int | None
    """metadata.generation of the job."""
    status: RLHFJobStatus
    pods: Sequence[PodView]
    """The job's pods (already filtered to this job's uid)."""
    progress: ProgressRead
    now: datetime.datetime


@dataclass
class Plan:
    status: RLHFJobStatus
    events: list[Event] = field(default_factory=list)
    create: list[str] = field(default_factory=list)
    """Worker pod names to create (roles and indexes from ``naming.desired_pods``)."""
    delete: list[str] = field(default_factory=list)
    """Worker pod names to delete."""


def enter(plan: Plan, obs: Observation, phase: Phase, reason: str, message: str) -> None:
    """Set phase, reason and message; an event when the phase changes (Warning for Failed)."""
    status = plan.status
    message = cap(message)
    changed = status.phase != phase
    status.phase, status.reason, status.message = phase, reason, message
    status.observed_generation = obs.generation
    if changed:
        kind = WARNING if phase is Phase.FAILED else NORMAL
        plan.events.append(Event(kind, reason if phase is Phase.FAILED else phase.value, message))
    active = phase in (Phase.INITIALIZING, Phase.RUNNING)
    set_condition(
        status,
        ConditionType.PROGRESSING,
        ConditionStatus.TRUE if active else ConditionStatus.FALSE,
        reason,
        message,
        obs.now,
        obs.generation,
    )


def finish(
    plan: Plan, obs: Observation, phase: Phase, reason: str, message: str, pods: Sequence[PodView]
) -> None:
    """Terminal: free the accelerators (delete still-active pods), keep finished ones' logs."""
    status = plan.status
    status.completion_time = timestamp(obs.now)
    kind = ConditionType.SUCCEEDED if phase is Phase.SUCCEEDED else ConditionType.FAILED
    set_condition(status, kind, ConditionStatus.TRUE, reason, message, obs.now, obs.generation)
    plan.delete += [p.name for p in pods if p.active and p.name not in plan.delete]
    status.generation_replicas = 0  # every active pod is deleted; none runs after this
    enter(plan, obs, phase, reason, message)
