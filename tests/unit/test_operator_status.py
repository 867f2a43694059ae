"""The pure status logic: pods + progress -> phase, conditions, events and pod actions.

Each test builds the observation a reconcile tick would see (pod views, a JobProgress, a
clock) and checks the plan: the phase machine Pending -> Initializing -> Running ->
Succeeded | Failed (and Suspended), backoff, deadlines, scaling, and what users read.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import yaml

from rlhfspec_api.manifest import RLHFJob, parse_rlhfjob
from rlhfspec_api.status import ConditionStatus, Phase, RLHFJobStatus
from rlhfspec_operator.conditions import condition, set_condition, timestamp
from rlhfspec_operator.metrics import Registry
from rlhfspec_operator.naming import desired_pods
from rlhfspec_operator.pods import PodView, pod_view
from rlhfspec_operator.progress import ProgressRead
from rlhfspec_operator.status import (
    Observation,
    Plan,
    parse_status,
    reconcile,
    started,
    validation_failed,
)
from rlhfspec_workers.messages import JobProgress

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
UID = "job-uid"


def make_job(**spec: Any) -> RLHFJob:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    doc["metadata"]["namespace"] = "ns"
    doc["spec"].update(copy.deepcopy(spec))
    return parse_rlhfjob(doc)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def pods(job: RLHFJob, phase: str = "Running", **overrides: PodView) -> list[PodView]:
    views = {
        name: PodView(
            name=name,
            job=job.name,
            role=role,
            index=index,
            uid=f"uid-{name}",
            owner_uid=UID,
            phase=phase,
            ready=phase == "Running",
        )
        for name, (role, index) in desired_pods(job.name, job.spec.generation.replicas).items()
    }
    views.update(overrides)
    return list(views.values())


def failed(
    name: str,
    detail: str = "container trainer terminated: OOMKilled (exit code 137)",
    role: str = "trainer",
    **kw: Any,
) -> PodView:
    return PodView(
        name=name,
        job="tiny-grpo",
        role=role,
        index=0,
        owner_uid=UID,
        phase="Failed",
        detail=detail,
        **kw,
    )


def tick(
    job: RLHFJob,
    status: RLHFJobStatus,
    views: list[PodView],
    now: float,
    progress: ProgressRead | None = None,
) -> Plan:
    return reconcile(Observation(job, 1, status, views, progress or ProgressRead(), at(now)))


def initializing(job: RLHFJob) -> RLHFJobStatus:
    status, events = started(job, 1, RLHFJobStatus(), T0)
    assert status.phase is Phase.INITIALIZING
    assert [e.reason for e in events] == ["Initializing"]
    return status


def running(job: RLHFJob) -> RLHFJobStatus:
    plan = tick(job, initializing(job), pods(job), 1)
    assert plan.status.phase is Phase.RUNNING
    return plan.status


def test_validation_failure_names_the_field_in_status_condition_and_event() -> None:
    status, event = validation_failed(["spec.models.critic: ppo needs a critic model"], 3, T0)
    assert status.phase is Phase.FAILED and status.reason == "ValidationFailed"
    assert status.message == "spec.models.critic: ppo needs a critic model"
    cond = condition(status, "Failed")
    assert cond is not None and cond.reason == "ValidationFailed" and cond.observed_generation == 3
    assert (event.type, event.reason) == ("Warning", "ValidationFailed")
    assert "spec.models.critic" in event.message


def test_a_new_job_initializes_and_becomes_running_when_every_pod_runs() -> None:
    job = make_job()
    status = initializing(job)
    assert status.progress == "0/4" and status.start_time == timestamp(T0)
    plan = tick(job, status, pods(job, phase="Pending"), 1)
    assert plan.status.phase is Phase.INITIALIZING and not plan.events and not plan.create
    assert plan.status.message is not None and plan.status.message.startswith("0/4 worker pods")
    plan = tick(job, plan.status, pods(job), 2)
    assert plan.status.phase is Phase.RUNNING
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "Running")]
    ready = condition(plan.status, "PodsReady")
    assert ready is not None and ready.status is ConditionStatus.TRUE
    assert ready.last_transition_time == timestamp(at(2))
    assert plan.status.start_time == timestamp(T0)
    assert plan.status.observed_generation == 1


def test_a_suspended_new_job_creates_no_pods() -> None:
    status, events = started(make_job(suspend=True), 1, RLHFJobStatus(), T0)
    assert status.phase is Phase.SUSPENDED and status.start_time is None
    assert [e.reason for e in events] == ["Suspended"]


def test_a_restarted_operator_keeps_the_status_it_finds() -> None:
    job = make_job()
    status = running(job)
    again, events = started(job, 1, status, at(5))
    assert again == status and events == []


def test_missing_pods_are_created_but_terminating_ones_are_waited_for() -> None:
    job = make_job()
    status = running(job)
    views = [p for p in pods(job) if p.role != "inference"]
    views = [
        p if p.role != "trainer" else PodView(**{**p.__dict__, "deleting": True}) for p in views
    ]
    plan = tick(job, status, views, 3)
    assert plan.create == ["tiny-grpo-inference"]
    assert plan.status.phase is Phase.INITIALIZING
    assert "tiny-grpo-inference: not created yet" in (plan.status.message or "")


def test_a_failed_pod_is_recreated_until_the_backoff_limit_then_the_job_fails() -> None:
    job = make_job(backoffLimit=1)
    status = running(job)
    plan = tick(job, status, pods(job, **{"tiny-grpo-trainer": failed("tiny-grpo-trainer")}), 3)
    assert plan.delete == ["tiny-grpo-trainer"] and plan.status.restarts == 1
    (event, phase_event) = plan.events
    assert (event.type, event.reason) == ("Warning", "PodFailed")
    assert "OOMKilled (exit code 137)" in event.message
    assert "resumes from its last checkpoint" in event.message
    assert phase_event.reason == "Initializing"
    # The same failed pod seen again while it terminates is not counted twice.
    terminating = failed("tiny-grpo-trainer", deleting=True)
    plan = tick(job, plan.status, pods(job, **{"tiny-grpo-trainer": terminating}), 4)
    assert plan.status.restarts == 1 and plan.delete == [] and plan.create == []
    plan = tick(
        job, plan.status, pods(job, **{"tiny-grpo-trainer": failed("tiny-grpo-trainer")}), 5
    )
    assert plan.status.phase is Phase.FAILED
    assert plan.status.reason == "BackoffLimitExceeded"
    assert "pod tiny-grpo-trainer failed: container trainer terminated: OOMKilled" in (
        plan.status.message or ""
    )
    assert plan.events[-1].type == "Warning"
    assert plan.events[-1].reason == "BackoffLimitExceeded"
    assert sorted(plan.delete) == sorted(
        n for n in desired_pods(job.name, 1) if n != "tiny-grpo-trainer"
    )
    failed_condition = condition(plan.status, "Failed")
    assert failed_condition is not None and failed_condition.status is ConditionStatus.TRUE
    assert plan.status.completion_time == timestamp(at(5))


def test_backoff_limit_zero_fails_on_the_first_failure() -> None:
    job = make_job(backoffLimit=0)
    gen = failed("tiny-grpo-generation-0", "Evicted: node low on memory", role="generation")
    plan = tick(job, running(job), pods(job, **{"tiny-grpo-generation-0": gen}), 3)
    assert plan.status.reason == "BackoffLimitExceeded"
    assert "Evicted: node low on memory" in (plan.status.message or "")


def test_the_coordinator_succeeding_completes_the_job_and_frees_the_other_pods() -> None:
    job = make_job()
    done = PodView(
        name="tiny-grpo-coordinator",
        job="tiny-grpo",
        role="coordinator",
        index=0,
        owner_uid=UID,
        phase="Succeeded",
    )
    progress = JobProgress(iteration=4, total_iterations=4, state="succeeded", reward_mean=0.9)
    plan = tick(
        job,
        running(job),
        pods(job, **{"tiny-grpo-coordinator": done}),
        9,
        ProgressRead(progress=progress, attempted=True),
    )
    assert plan.status.phase is Phase.SUCCEEDED and plan.status.reason == "Completed"
    assert "4/4" in (plan.status.message or "")
    assert plan.status.reward_mean == 0.9
    assert "tiny-grpo-coordinator" not in plan.delete and len(plan.delete) == 3
    assert [e.reason for e in plan.events] == ["Succeeded"]
    progressing = condition(plan.status, "Progressing")
    assert progressing is not None and progressing.status is ConditionStatus.FALSE


def test_terminal_phases_are_final() -> None:
    job = make_job()
    status, _ = validation_failed(["spec.x: bad"], 1, T0)
    plan = tick(job, status, pods(job), 5)
    assert plan.status == status and not plan.events and not plan.create and not plan.delete


def test_active_deadline_fails_the_job() -> None:
    job = make_job(activeDeadlineSeconds=60)
    status = running(job)
    assert tick(job, status, pods(job), 59).status.phase is Phase.RUNNING
    plan = tick(job, status, pods(job), 61)
    assert plan.status.reason == "DeadlineExceeded" and "60s" in (plan.status.message or "")
    assert len(plan.delete) == 4


def test_stuck_initializing_fails_at_the_startup_deadline_with_the_pods_reason() -> None:
    job = make_job(startupDeadlineSeconds=30)
    pulling = PodView(
        name="tiny-grpo-trainer",
        job="tiny-grpo",
        role="trainer",
        index=0,
        owner_uid=UID,
        detail="container trainer waiting: ImagePullBackOff",
    )
    views = pods(job, **{"tiny-grpo-trainer": pulling})
    status = initializing(job)
    assert tick(job, status, views, 29).status.phase is Phase.INITIALIZING
    plan = tick(job, status, views, 31)
    assert plan.status.reason == "StartupDeadlineExceeded"
    assert "tiny-grpo-trainer: Pending (container trainer waiting: ImagePullBackOff)" in (
        plan.status.message or ""
    )
    assert plan.create == []


def test_a_pod_lost_while_running_restarts_the_startup_clock() -> None:
    job = make_job(startupDeadlineSeconds=30)
    status = running(job)  # running since t=1
    lost = [p for p in pods(job) if p.role != "inference"]
    plan = tick(job, status, lost, 100)
    assert plan.status.phase is Phase.INITIALIZING and plan.create == ["tiny-grpo-inference"]
    assert tick(job, plan.status, lost, 129).status.phase is Phase.INITIALIZING
    assert tick(job, plan.status, lost, 131).status.reason == "StartupDeadlineExceeded"


def test_suspend_deletes_worker_pods_and_resume_restarts_the_clocks() -> None:
    job = make_job(activeDeadlineSeconds=100, startupDeadlineSeconds=30)
    status = running(job)
    suspended_job = make_job(activeDeadlineSeconds=100, startupDeadlineSeconds=30, suspend=True)
    plan = tick(suspended_job, status, pods(job), 10)
    assert plan.status.phase is Phase.SUSPENDED and len(plan.delete) == 4
    assert [e.reason for e in plan.events] == ["Suspended"]
    suspended = condition(plan.status, "Suspended")
    assert suspended is not None and suspended.status is ConditionStatus.TRUE
    plan = tick(suspended_job, plan.status, [], 500)  # long after both deadlines
    assert plan.status.phase is Phase.SUSPENDED and not plan.events
    plan = tick(job, plan.status, [], 600)
    assert plan.status.phase is Phase.INITIALIZING
    assert sorted(plan.create) == sorted(desired_pods(job.name, 1))
    assert plan.status.start_time == timestamp(at(600))
    assert tick(job, plan.status, pods(job, phase="Pending"), 620).status.phase is (
        Phase.INITIALIZING
    )
    assert tick(job, plan.status, pods(job, phase="Pending"), 631).status.reason == (
        "StartupDeadlineExceeded"
    )
    assert tick(job, plan.status, pods(job), 690).status.phase is Phase.RUNNING
    assert tick(job, plan.status, pods(job), 701).status.reason == "DeadlineExceeded"


def test_scaling_generation_replicas_creates_and_deletes_generation_pods() -> None:
    job = make_job()
    status = running(job)
    bigger = make_job(generation={**job.spec.generation.to_wire(), "replicas": 3})
    plan = tick(bigger, status, pods(job), 5)
    assert plan.create == ["tiny-grpo-generation-1", "tiny-grpo-generation-2"]
    assert plan.status.phase is Phase.INITIALIZING  # until the new replicas run
    smaller = make_job()
    plan = tick(smaller, plan.status, pods(bigger), 6)
    assert sorted(plan.delete) == ["tiny-grpo-generation-1", "tiny-grpo-generation-2"]
    assert [e.reason for e in plan.events] == ["ScaledDown", "ScaledDown", "Running"]
    assert plan.status.phase is Phase.RUNNING


def test_progress_fills_the_printer_columns_and_reachability_events_fire_once() -> None:
    job = make_job()
    status = running(job)
    progress = JobProgress(
        iteration=2,
        total_iterations=4,
        tokens_per_second=1234.5,
        mean_accepted_length=2.7,
        strategy="suffix:k=4",
        strategy_table_version=7,
        migrations=11,
        reward_mean=0.42,
        kl=0.01,
        weight_version=2,
        updated_at=at(3).timestamp(),
    )
    plan = tick(job, status, pods(job), 4, ProgressRead(progress=progress, attempted=True))
    wire = plan.status.to_wire()
    assert wire["progress"] == "2/4" and wire["iteration"] == 2
    assert wire["generation"] == {
        "tokensPerSecond": 1234.5,
        "meanAcceptedLength": 2.7,
        "strategy": "suffix:k=4",
        "strategyTableVersion": 7,
        "migrations": 11,
        "weightVersion": 2,
    }
    assert wire["rewardMean"] == 0.42 and wire["kl"] == 0.01
    assert wire["message"] == "iteration 2/4"
    reachable = condition(plan.status, "CoordinatorReachable")
    assert reachable is not None and reachable.status is ConditionStatus.TRUE
    down = ProgressRead(error="ConnectionError: refused", attempted=True)
    plan = tick(job, plan.status, pods(job), 5, down)
    assert [e.reason for e in plan.events] == ["CoordinatorUnreachable"]
    assert plan.status.progress == "2/4"  # the last known numbers stay
    plan = tick(job, plan.status, pods(job), 6, down)
    assert plan.events == []
    plan = tick(job, plan.status, pods(job), 7, ProgressRead(attempted=True))
    assert [e.reason for e in plan.events] == ["CoordinatorReachable"]


def test_a_coordinator_reporting_failure_fails_the_job() -> None:
    job = make_job()
    progress = JobProgress(iteration=1, total_iterations=4, state="failed", message="NaN loss")
    plan = tick(job, running(job), pods(job), 4, ProgressRead(progress=progress, attempted=True))
    assert plan.status.reason == "CoordinatorFailed" and plan.status.message == "NaN loss"


def test_pod_view_reads_exit_reasons_waiting_reasons_and_scheduling() -> None:
    body = {
        "metadata": {
            "name": "j-trainer",
            "uid": "u1",
            "labels": {
                "rlhfspec.io/job": "j",
                "rlhfspec.io/role": "trainer",
                "rlhfspec.io/worker-index": "0",
            },
            "ownerReferences": [{"uid": "owner", "controller": True}],
        },
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                }
            ],
        },
    }
    view = pod_view(body)
    assert (view.job, view.role, view.owner_uid, view.phase) == ("j", "trainer", "owner", "Failed")
    assert view.detail == "container trainer terminated: OOMKilled (exit code 137)"
    body["status"] = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes: insufficient nvidia.com/gpu",
            }
        ],
    }
    assert pod_view(body).detail == "Unschedulable: 0/3 nodes: insufficient nvidia.com/gpu"
    body["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}
    assert not pod_view(body).running
    body["status"] = {"phase": "Running"}
    assert pod_view(body).running


def test_conditions_move_their_transition_time_only_on_a_status_change() -> None:
    status = RLHFJobStatus()
    set_condition(status, "PodsReady", ConditionStatus.FALSE, "A", "a", T0, 1)
    set_condition(status, "PodsReady", ConditionStatus.FALSE, "B", "b", at(10), 2)
    cond = condition(status, "PodsReady")
    assert cond is not None and cond.last_transition_time == timestamp(T0) and cond.reason == "B"
    set_condition(status, "PodsReady", ConditionStatus.TRUE, "C", "c", at(20), 2)
    cond = condition(status, "PodsReady")
    assert cond is not None and cond.last_transition_time == timestamp(at(20))
    assert len(status.conditions) == 1


def test_parse_status_ignores_foreign_keys_and_garbage() -> None:
    assert parse_status({"phase": "Running", "kopf": {"progress": {}}}).phase is Phase.RUNNING
    assert parse_status({"phase": "Exploded"}) == RLHFJobStatus()
    assert parse_status(None) == RLHFJobStatus()


def test_metrics_render_the_status_numbers_in_prometheus_text_format() -> None:
    job = make_job()
    progress = JobProgress(iteration=3, total_iterations=4, tokens_per_second=50.0)
    plan = tick(job, running(job), pods(job), 4, ProgressRead(progress=progress, attempted=True))
    registry = Registry()
    registry.observe("ns", "tiny-grpo", plan.status)
    registry.count("rlhfspec_operator_pods_created_total", 4)
    text = registry.render()
    assert 'rlhfspec_job_phase{namespace="ns",job="tiny-grpo",phase="Running"} 1' in text
    assert 'rlhfspec_job_phase{namespace="ns",job="tiny-grpo",phase="Failed"} 0' in text
    assert 'rlhfspec_job_iteration{namespace="ns",job="tiny-grpo"} 3' in text
    assert 'rlhfspec_job_tokens_per_second{namespace="ns",job="tiny-grpo"} 50' in text
    assert "rlhfspec_job_reward_mean{" not in text  # unknown values are left out
    assert "rlhfspec_operator_pods_created_total 4" in text
    registry.forget("ns", "tiny-grpo")
    assert "tiny-grpo" not in registry.render()


def test_a_worker_exiting_early_is_recreated_without_counting_a_failure() -> None:
    job = make_job(backoffLimit=0)
    done = PodView(
        name="tiny-grpo-inference",
        job="tiny-grpo",
        role="inference",
        index=0,
        owner_uid=UID,
        phase="Succeeded",
    )
    plan = tick(job, running(job), pods(job, **{"tiny-grpo-inference": done}), 3)
    assert plan.delete == ["tiny-grpo-inference"] and plan.status.restarts == 0
    assert [e.reason for e in plan.events] == ["PodExited", "Initializing"]
    finished = JobProgress(iteration=4, total_iterations=4, state="succeeded")
    plan = tick(
        job,
        running(job),
        pods(job, **{"tiny-grpo-inference": done}),
        3,
        ProgressRead(progress=finished, attempted=True),
    )
    assert plan.delete == []  # the run is over: workers may leave before the coordinator
    assert plan.status.phase is Phase.RUNNING
