"""Pure status logic: observed pods + coordinator progress -> phase, conditions, events, actions.

Where it sits: the reconcile timer (``handlers.reconcile``) gathers an :class:`Observation`
(the parsed job, its status, the pod index's :class:`~rlhfspec_operator.pods.PodView`s, the
coordinator's ``JobProgress`` from Redis) and calls :func:`reconcile`; it then deletes and
creates the pods the :class:`Plan` names, posts its events and patches its status. Nothing here
calls the API or reads a clock, so every transition is unit-tested with plain values.

Phases: Pending -> Initializing -> Running -> Succeeded | Failed, and Suspended from any
non-terminal phase. Initializing means "not every worker pod is running" (at start, after a
pod was recreated, after a resume); the startup deadline is measured from the moment the job
last entered that state. ``activeDeadlineSeconds`` counts from ``startTime``, which a resume
resets (as for Kubernetes Jobs).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from rlhfspec_operator.naming import COORDINATOR, GENERATION, TRAINER, desired_pods, selector
from rlhfspec_operator.pods import FAILED, SUCCEEDED, PodView
from rlhfspec_operator.progress import ProgressRead, apply_progress
from rlhfspec_operator.queueing import admitted_since, apply_queue
from rlhfspec_operator.storage_condition import apply_storage

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


def parse_status(raw: object) -> RLHFJobStatus:
    """The job's current status; kopf's own keys and garbage are dropped, never fatal."""
    if not isinstance(raw, dict):
        return RLHFJobStatus()
    known = {f.alias or name for name, f in RLHFJobStatus.model_fields.items()}
    try:
        return RLHFJobStatus.model_validate({k: v for k, v in raw.items() if k in known})
    except ValueError:
        return RLHFJobStatus()


def _enter(plan: Plan, obs: Observation, phase: Phase, reason: str, message: str) -> None:
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
        _enter(plan, obs, Phase.INITIALIZING, "PodsStarting", f"creating {pods} worker pods")
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
    _enter(plan, obs, Phase.SUSPENDED, "Suspended", message)


def _finish(
    plan: Plan, obs: Observation, phase: Phase, reason: str, message: str, pods: Sequence[PodView]
) -> None:
    """Terminal: free the accelerators (delete still-active pods), keep finished ones' logs."""
    status = plan.status
    status.completion_time = timestamp(obs.now)
    kind = ConditionType.SUCCEEDED if phase is Phase.SUCCEEDED else ConditionType.FAILED
    set_condition(status, kind, ConditionStatus.TRUE, reason, message, obs.now, obs.generation)
    plan.delete += [p.name for p in pods if p.active and p.name not in plan.delete]
    status.generation_replicas = 0  # every active pod is deleted; none runs after this
    _enter(plan, obs, phase, reason, message)


def fail(obs: Observation, reason: str, message: str) -> Plan:
    """Fail an active job for what the handlers found outside this state machine (a child
    name held by an object the job does not own); its still-active pods are deleted."""
    plan = Plan(obs.status.model_copy(deep=True))
    _finish(plan, obs, Phase.FAILED, reason, message, sorted(obs.pods, key=lambda p: p.name))
    return plan


def generation_selector(job: str) -> str:
    """The generation pods' label selector as a string (status.selector of the scale
    subresource)."""
    return ",".join(f"{key}={value}" for key, value in selector(job, GENERATION).items())


def _count_generation(status: RLHFJobStatus, job: str, pods: Sequence[PodView]) -> None:
    """What `kubectl scale` and `-o wide` read: generation pods running now, and whose."""
    status.generation_replicas = sum(1 for p in pods if p.role == GENERATION and p.running)
    status.selector = generation_selector(job)


def _startup_since(status: RLHFJobStatus) -> datetime.datetime | None:
    """When the job last entered "not every pod is running" (a resume restarts the clock)."""
    moments = []
    ready = condition(status, ConditionType.PODS_READY)
    if ready is not None and ready.status is ConditionStatus.FALSE:
        moments.append(parse_time(ready.last_transition_time))
    suspended = condition(status, ConditionType.SUSPENDED)
    if suspended is not None and suspended.status is ConditionStatus.FALSE:
        moments.append(parse_time(suspended.last_transition_time))
    known = [m for m in moments if m is not None]
    return max(known) if known else None


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
    if _pod_exits(plan, obs, pods, live):
        return plan
    desired = _scale(plan, obs, pods, live)
    _readiness(plan, obs, pods, live, desired)
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
    _finish(plan, obs, Phase.FAILED, "DeadlineExceeded", message, pods)
    return True


def _coordinator_failed(plan: Plan, obs: Observation, pods: Sequence[PodView]) -> bool:
    """Failed/CoordinatorFailed when the coordinator reported a failure in its progress."""
    progress = obs.progress.progress
    if progress is None or progress.state != "failed":
        return False
    message = progress.message or "the coordinator reported a failure"
    _finish(plan, obs, Phase.FAILED, "CoordinatorFailed", message, pods)
    return True


def _pod_exits(
    plan: Plan, obs: Observation, pods: Sequence[PodView], live: Sequence[PodView]
) -> bool:
    """Pods that ended: the coordinator's success ends the job; a worker that exits 0 early
    is recreated; a failed pod is recreated until backoffLimit, then the job fails."""
    status, spec = plan.status, obs.job.spec
    progress = obs.progress.progress
    restarts = status.restarts or 0
    for pod in live:
        if pod.role == COORDINATOR and pod.phase == SUCCEEDED:
            done = f"{status.iteration or 0}/{status.total_iterations or 0}"
            message = f"the coordinator finished after {done} iterations"
            _finish(plan, obs, Phase.SUCCEEDED, "Completed", message, pods)
            return True
        if pod.phase == SUCCEEDED and not (progress is not None and progress.state == "succeeded"):
            # A worker that exits 0 while the job still runs stopped serving: bring it back.
            # Not a failure, so it does not count against backoffLimit.
            plan.delete.append(pod.name)
            message = f"pod {pod.name} exited 0 before the coordinator finished; recreating it"
            plan.events.append(Event(WARNING, "PodExited", message))
            continue
        if pod.phase != FAILED:
            continue
        failure = f"pod {pod.name} failed" + (f": {pod.detail}" if pod.detail else "")
        if restarts >= spec.backoff_limit:
            status.restarts = restarts
            message = (
                f"{failure}; backoffLimit {spec.backoff_limit} reached after {restarts} restart(s)"
            )
            _finish(plan, obs, Phase.FAILED, "BackoffLimitExceeded", message, pods)
            return True
        restarts += 1
        plan.delete.append(pod.name)
        resume = " (it resumes from its last checkpoint)" if pod.role == TRAINER else ""
        message = (
            f"{failure}; recreating it{resume}, restart {restarts} of backoffLimit "
            f"{spec.backoff_limit}"
        )
        plan.events.append(Event(WARNING, "PodFailed", message))
    status.restarts = restarts
    return False


def _scale(
    plan: Plan, obs: Observation, pods: Sequence[PodView], live: Sequence[PodView]
) -> list[str]:
    """Delete generation pods above generation.replicas, create the missing desired pods;
    returns the desired pod names (in creation order)."""
    replicas = obs.job.spec.generation.replicas
    desired = list(desired_pods(obs.job.name, replicas))
    for pod in live:
        if pod.role == GENERATION and pod.name not in desired and pod.name not in plan.delete:
            plan.delete.append(pod.name)
            message = f"deleted pod {pod.name}: generation.replicas is {replicas}"
            plan.events.append(Event(NORMAL, "ScaledDown", message))
    present = {p.name for p in pods}  # a terminating pod's name is taken until it is gone
    plan.create = [name for name in desired if name not in present]
    return desired


def _readiness(
    plan: Plan,
    obs: Observation,
    pods: Sequence[PodView],
    live: Sequence[PodView],
    desired: Sequence[str],
) -> None:
    """PodsReady and the phase it implies: Running when every desired pod runs; else
    Initializing (Queued while a queue holds the gang), or Failed/StartupDeadlineExceeded."""
    status, now, generation = plan.status, obs.now, obs.generation
    progress = obs.progress.progress
    by_name = {p.name: p for p in live if p.name not in plan.delete}
    finishing = progress is not None and progress.state == "succeeded"

    def up(name: str) -> bool:
        pod = by_name.get(name)
        return pod is not None and (pod.running or (finishing and pod.phase == SUCCEEDED))

    waiting = [n for n in desired if not up(n)]
    queued = apply_queue(status, [by_name.get(n) for n in waiting], now, generation)
    if not waiting:
        total = len(desired)
        message = f"{total}/{total} worker pods running"
        set_condition(
            status, ConditionType.PODS_READY, ConditionStatus.TRUE, "AllPodsRunning", message,
            now, generation,
        )  # fmt: skip
        if status.start_time is None:
            status.start_time = timestamp(now)
        message = f"iteration {status.progress}" if status.progress else "training"
        _enter(plan, obs, Phase.RUNNING, "Training", message)
        return
    details = [by_name[n].describe() if n in by_name else f"{n}: not created yet" for n in waiting]
    running = len(desired) - len(details)
    message = f"{running}/{len(desired)} worker pods running; waiting for " + "; ".join(details)
    set_condition(
        status, ConditionType.PODS_READY, ConditionStatus.FALSE, "PodsNotReady", message, now,
        generation,
    )  # fmt: skip
    if queued:  # a queue holds the gang (Kueue): waiting for admission is not starting late
        _enter(plan, obs, Phase.INITIALIZING, "Queued", message)
        return
    since = max((m for m in (_startup_since(status), admitted_since(status)) if m), default=now)
    limit = obs.job.spec.startup_deadline_seconds
    if (now - since).total_seconds() > limit:
        message = (
            f"worker pods not running {limit}s after start (startupDeadlineSeconds): "
            + "; ".join(details)
        )
        _finish(plan, obs, Phase.FAILED, "StartupDeadlineExceeded", message, pods)
        plan.create = []
        return
    _enter(plan, obs, Phase.INITIALIZING, "PodsStarting", message)
