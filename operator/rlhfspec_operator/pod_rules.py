"""The pod rules of the state machine: exits and restarts, scaling, readiness.

Where it sits: ``status.reconcile`` calls :func:`pod_exits`, then :func:`scale`, then
:func:`readiness` on every tick of a job that is neither terminal nor suspended. Pure: the
pods come in as ``PodView``s, the deletions, creations and events go out in the ``Plan``.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from rlhfspec_api.status import ConditionStatus, ConditionType, Phase, RLHFJobStatus
from rlhfspec_operator.conditions import condition, parse_time, set_condition, timestamp
from rlhfspec_operator.naming import COORDINATOR, GENERATION, TRAINER, desired_pods
from rlhfspec_operator.pods import FAILED, SUCCEEDED, PodView
from rlhfspec_operator.queueing import admitted_since, apply_queue
from rlhfspec_operator.status_plan import NORMAL, WARNING, Event, Observation, Plan, enter, finish


def startup_since(status: RLHFJobStatus) -> datetime.datetime | None:
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


def pod_exits(
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
            finish(plan, obs, Phase.SUCCEEDED, "Completed", message, pods)
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
            finish(plan, obs, Phase.FAILED, "BackoffLimitExceeded", message, pods)
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


def scale(
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


def readiness(
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
        enter(plan, obs, Phase.RUNNING, "Training", message)
        return
    details = [by_name[n].describe() if n in by_name else f"{n}: not created yet" for n in waiting]
    running = len(desired) - len(details)
    message = f"{running}/{len(desired)} worker pods running; waiting for " + "; ".join(details)
    set_condition(
        status, ConditionType.PODS_READY, ConditionStatus.FALSE, "PodsNotReady", message, now,
        generation,
    )  # fmt: skip
    if queued:  # a queue holds the gang (Kueue): waiting for admission is not starting late
        enter(plan, obs, Phase.INITIALIZING, "Queued", message)
        return
    since = max((m for m in (startup_since(status), admitted_since(status)) if m), default=now)
    limit = obs.job.spec.startup_deadline_seconds
    if (now - since).total_seconds() > limit:
        message = (
            f"worker pods not running {limit}s after start (startupDeadlineSeconds): "
            + "; ".join(details)
        )
        finish(plan, obs, Phase.FAILED, "StartupDeadlineExceeded", message, pods)
        plan.create = []
        return
    enter(plan, obs, Phase.INITIALIZING, "PodsStarting", message)
