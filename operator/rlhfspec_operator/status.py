"""Pure status logic: observed pods + coordinator progress -> phase, conditions, events, actions.

Where it sits: the reconcile timer (``handlers.reconcile``) gathers an :class:`Observation`
(the parsed job, its status, the pod index's :class:`~rlhfspec_operator.pods.PodView`s, the
coordinator's ``JobProgress`` from Redis) and calls :func:`reconcile`; it then deletes and
creates the pods the :class:`Plan` names, posts its events and patches its status. Nothing here
calls the API or reads a clock, so every transition is unit-tested with plain values. The
vocabulary (:class:`Observation`, :class:`Plan`, :class:`Event`, entering a phase, finishing)
is ``status_plan``'s; the rules about pods (exits and restarts, scaling, readiness) are
``pod_rules``'.

Phases: Pending -> Initializing -> Running -> Succeeded | Failed, and Suspended from any
non-terminal phase. Initializing means "not every worker pod is running" (at start, after a
pod was recreated, after a resume); the startup deadline is measured from the moment the job
last entered that state. ``activeDeadlineSeconds`` counts from ``startTime``, which a resume
resets (as for Kubernetes Jobs).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from rlhfspec_api.echo import cap
from rlhfspec_api.manifest import RLHFJob
from rlhfspec_api.status import (
    TERMINAL_PHASES,
    ConditionStatus,
    ConditionType,
    Phase,
    RLHFJobStatus,
)
from rlhfspec_operator.conditions import condition, parse_time, set_condition, timestamp
from rlhfspec_operator.drafter_condition import apply_drafters
from rlhfspec_operator.fetch_init import set_models_ready
from rlhfspec_operator.naming import GENERATION, desired_pods, selector
from rlhfspec_operator.pod_rules import pod_exits, readiness, scale
from rlhfspec_operator.pods import PodView
from rlhfspec_operator.progress import ProgressRead, apply_progress
from rlhfspec_operator.status_plan import WARNING, Event, Observation, Plan, enter, finish
from rlhfspec_operator.storage_condition import apply_storage

__all__ = [
    "Event",
    "Observation",
    "Plan",
    "fail",
    "generation_selector",
    "parse_status",
    "reconcile",
    "started",
    "validation_failed",
]


def parse_status(raw: object) -> RLHFJobStatus:
    """The job's current status; kopf's own keys and garbage are dropped, never fatal."""
    if not isinstance(raw, dict):
        return RLHFJobStatus()
    known = {f.alias or name for name, f in RLHFJobStatus.model_fields.items()}
    try:
        return RLHFJobStatus.model_validate({k: v for k, v in raw.items() if k in known})
    except ValueError:
        return RLHFJobStatus()


def validation_failed(
    errors: Sequence[str],
    generation: int | None,
    now: datetime.datetime,
    reason: str = "ValidationFailed",
) -> tuple[RLHFJobStatus, Event]:
    """Status and event of a job refused before it starts (nothing else is created):
    ValidationFailed for the contract, another ``reason`` for the cluster's policy or a
    child name someone else holds."""
    # Capped: a refused manifest's errors quote its values, and the status (message and
    # Failed condition) and the event each hold a copy; uncapped, one huge field could push
    # the object past etcd's 1.5 MiB limit.
    message = cap("; ".join(errors))
    status = RLHFJobStatus(
        phase=Phase.FAILED,
        reason=reason,
        message=message,
        completion_time=timestamp(now),
        observed_generation=generation,
    )
    set_condition(
        status, ConditionType.FAILED, ConditionStatus.TRUE, reason, message, now, generation
    )
    return status, Event(WARNING, reason, message)


def started(
    job: RLHFJob, generation: int | None, previous: RLHFJobStatus, now: datetime.datetime
) -> tuple[RLHFJobStatus, list[Event]]:
    """Status once the children exist: Initializing (or Suspended), never Pending again."""
    status = previous.model_copy(deep=True)
    if status.phase is not Phase.PENDING:
        return status, []  # a resumed operator: the job is past this point, the timer owns it
    total = job.spec.algorithm.iterations
    status.total_iterations = total
    status.iteration = status.iteration or 0
    status.progress = f"{status.iteration}/{total}"
    status.restarts = status.restarts or 0
    _count_generation(status, job.name, [])
    plan = Plan(status)
    obs = Observation(job, generation, status, [], ProgressRead(), now)
    if job.spec.suspend:
        _suspend(plan, obs, pods_deleted=0)
    else:
        pods = len(desired_pods(job.name, job.spec.generation.replicas))
        status.start_time = timestamp(now)
        set_condition(
            status,
            ConditionType.PODS_READY,
            ConditionStatus.FALSE,
            "PodsStarting",
            f"0/{pods} worker pods running",
            now,
            generation,
        )
        enter(plan, obs, Phase.INITIALIZING, "PodsStarting", f"creating {pods} worker pods")
    return plan.status, plan.events


def _suspend(plan: Plan, obs: Observation, pods_deleted: int) -> None:
    status = plan.status
    message = "worker pods deleted; Redis state and checkpoints are kept"
    if pods_deleted:
        message = f"{pods_deleted} {message}"
    set_condition(
        status,
        ConditionType.SUSPENDED,
        ConditionStatus.TRUE,
        "Suspended",
        message,
        obs.now,
        obs.generation,
    )
    set_condition(
        status,
        ConditionType.PODS_READY,
        ConditionStatus.FALSE,
        "Suspended",
        "job is suspended",
        obs.now,
        obs.generation,
    )
    enter(plan, obs, Phase.SUSPENDED, "Suspended", message)


def fail(obs: Observation, reason: str, message: str) -> Plan:
    """Fail an active job for what the handlers found outside this state machine (a child
    name held by an object the job does not own); its still-active pods are deleted."""
    plan = Plan(obs.status.model_copy(deep=True))
    finish(plan, obs, Phase.FAILED, reason, message, sorted(obs.pods, key=lambda p: p.name))
    return plan


def generation_selector(job: str) -> str:
    """The generation pods' label selector as a string (status.selector of the scale
    subresource)."""
    return ",".join(f"{key}={value}" for key, value in selector(job, GENERATION).items())


def _count_generation(status: RLHFJobStatus, job: str, pods: Sequence[PodView]) -> None:
    """What `kubectl scale` and `-o wide` read: generation pods running now, and whose."""
    status.generation_replicas = sum(1 for p in pods if p.role == GENERATION and p.running)
    status.selector = generation_selector(job)


def reconcile(obs: Observation) -> Plan:
    """One step of the state machine; see the module docstring for the phases.

    Each step below owns one transition or condition and returns True when it ended the
    job (Succeeded or Failed): the steps after it do not run."""
    plan = Plan(obs.status.model_copy(deep=True))
    status = plan.status
    if status.phase in TERMINAL_PHASES or status.phase is Phase.PENDING:
        return plan  # terminal is final; Pending belongs to the create handler
    _observe(plan, obs)
    pods = sorted(obs.pods, key=lambda p: p.name)
    live = [p for p in pods if not p.deleting]
    if obs.job.spec.suspend:
        plan.delete = [p.name for p in live]
        if status.phase is not Phase.SUSPENDED:
            _suspend(plan, obs, pods_deleted=len(plan.delete))
        return plan
    if status.phase is Phase.SUSPENDED:
        _resume(plan, obs)
    if _deadline(plan, obs, pods) or _coordinator_failed(plan, obs, pods):
        return plan
    if pod_exits(plan, obs, pods, live):
        return plan
    desired = scale(plan, obs, pods, live)
    readiness(plan, obs, pods, live, desired)
    return plan


def _observe(plan: Plan, obs: Observation) -> None:
    """Conditions read off the world, whatever the phase: CoordinatorReachable and the
    progress (Redis), StorageFull (the trainer's report), DrafterCollapsed (the coordinator's
    pooled acceptance), ModelsReady (the fetch init containers), and the generation pod count
    (the scale subresource)."""
    status, now, generation = plan.status, obs.now, obs.generation
    reachable_before = condition(status, ConditionType.COORDINATOR_REACHABLE)
    iterations = obs.job.spec.algorithm.iterations
    for event in apply_progress(
        status, obs.progress, iterations, now, generation, reachable_before
    ):
        plan.events.append(Event(*event))
    for event in apply_storage(status, obs.progress, now, generation):
        plan.events.append(Event(*event))  # StorageFull: a condition, the job keeps running
    for event in apply_drafters(status, obs.progress, now, generation):
        plan.events.append(Event(*event))  # DrafterCollapsed: the selector drops the drafter
    set_models_ready(status, obs.job, obs.pods, now, generation)
    _count_generation(status, obs.job.name, sorted(obs.pods, key=lambda p: p.name))


def _resume(plan: Plan, obs: Observation) -> None:
    """Suspended -> back to starting: activeDeadlineSeconds restarts, as for Jobs."""
    status, now = plan.status, obs.now
    status.start_time = timestamp(now)
    set_condition(
        status,
        ConditionType.SUSPENDED,
        ConditionStatus.FALSE,
        "Resumed",
        "suspend set to false; recreating worker pods",
        now,
        obs.generation,
    )
    set_condition(
        status,
        ConditionType.PODS_READY,
        ConditionStatus.FALSE,
        "PodsStarting",
        "job resumed",
        now,
        obs.generation,
    )


def _deadline(plan: Plan, obs: Observation, pods: Sequence[PodView]) -> bool:
    """Failed/DeadlineExceeded once the job was active longer than activeDeadlineSeconds."""
    deadline = obs.job.spec.active_deadline_seconds
    started_at = parse_time(plan.status.start_time)
    if deadline is None or started_at is None:
        return False
    if (obs.now - started_at).total_seconds() <= deadline:
        return False
    message = f"job was active longer than activeDeadlineSeconds ({deadline}s)"
    finish(plan, obs, Phase.FAILED, "DeadlineExceeded", message, pods)
    return True


def _coordinator_failed(plan: Plan, obs: Observation, pods: Sequence[PodView]) -> bool:
    """Failed/CoordinatorFailed when the coordinator reported a failure in its progress."""
    progress = obs.progress.progress
    if progress is None or progress.state != "failed":
        return False
    message = progress.message or "the coordinator reported a failure"
    finish(plan, obs, Phase.FAILED, "CoordinatorFailed", message, pods)
    return True
