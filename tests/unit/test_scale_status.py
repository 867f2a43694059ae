"""The scale subresource's status side: ``status.generationReplicas`` counts the generation pods
running now and ``status.selector`` names them, on every tick and from the first status on;
a changed ``spec.generation.replicas`` creates or deletes generation pods until they match.

Pure (``status.reconcile`` on plain values); the emulator test of the same path, driven by
kubectl, is ``tests/operator/test_operator_status_columns.py``.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import yaml

from rlhfspec_api.manifest import RLHFJob, parse_rlhfjob
from rlhfspec_api.status import ConditionType, Phase, RLHFJobStatus
from rlhfspec_operator import updates
from rlhfspec_operator.conditions import condition
from rlhfspec_operator.naming import desired_pods
from rlhfspec_operator.pods import PodView
from rlhfspec_operator.progress import ProgressRead
from rlhfspec_operator.spec_condition import spec_accepted, track
from rlhfspec_operator.status import Observation, generation_selector, reconcile, started

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
UID = "job-uid"


def make_job(replicas: int) -> RLHFJob:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    doc["metadata"]["namespace"] = "ns"
    doc["spec"]["generation"] = {**copy.deepcopy(doc["spec"]["generation"]), "replicas": replicas}
    return parse_rlhfjob(doc)


def view(job: RLHFJob, name: str, role: str, index: int, phase: str) -> PodView:
    return PodView(
        name=name,
        job=job.name,
        role=role,
        index=index,
        uid=f"uid-{name}",
        owner_uid=UID,
        phase=phase,
        ready=phase == "Running",
    )


def running_pods(job: RLHFJob, generation: int, pending: tuple[int, ...] = ()) -> list[PodView]:
    """Every worker pod of a job with ``generation`` generation pods, Running unless its index
    is in ``pending``."""
    names = desired_pods(job.name, generation)
    return [
        view(
            job,
            name,
            role,
            index,
            "Pending" if role == "generation" and index in pending else "Running",
        )
        for name, (role, index) in names.items()
    ]


def tick(job: RLHFJob, status: RLHFJobStatus, pods: list[PodView]) -> Any:
    return reconcile(Observation(job, 2, status, pods, ProgressRead(), NOW))


def running_status() -> RLHFJobStatus:
    return RLHFJobStatus(phase=Phase.RUNNING, start_time="2026-01-01T11:59:00Z")


def test_first_status_has_zero_ready_replicas_and_the_selector() -> None:
    job = make_job(3)
    status, _ = started(job, 1, RLHFJobStatus(), NOW)
    assert status.generation_replicas == 0
    assert status.selector == "rlhfspec.io/job=tiny-grpo,rlhfspec.io/role=generation"
    assert status.to_wire()["generationReplicas"] == 0


def test_ready_replicas_count_only_running_generation_pods() -> None:
    job = make_job(3)
    plan = tick(job, running_status(), running_pods(job, 3, pending=(2,)))
    assert plan.status.generation_replicas == 2
    assert plan.status.selector == generation_selector(job.name)
    plan = tick(job, running_status(), running_pods(job, 3))
    assert plan.status.generation_replicas == 3
    assert plan.status.phase is Phase.RUNNING


def test_scaling_up_creates_the_missing_generation_pods() -> None:
    job = make_job(4)
    plan = tick(job, running_status(), running_pods(job, 2))
    assert plan.create == ["tiny-grpo-generation-2", "tiny-grpo-generation-3"]
    assert plan.delete == []
    assert plan.status.generation_replicas == 2  # the new ones are not running yet
    assert plan.status.phase is Phase.INITIALIZING


def test_scaling_down_deletes_the_highest_indexes_with_an_event() -> None:
    job = make_job(1)
    plan = tick(job, running_status(), running_pods(job, 3))
    assert sorted(plan.delete) == ["tiny-grpo-generation-1", "tiny-grpo-generation-2"]
    assert plan.create == []
    reasons = [(e.reason, e.message) for e in plan.events]
    assert ("ScaledDown", "deleted pod tiny-grpo-generation-2: generation.replicas is 1") in reasons


def test_a_finished_job_reports_no_running_replicas() -> None:
    job = make_job(2)
    pods = running_pods(job, 2)
    pods = [
        view(job, p.name, p.role, p.index, "Succeeded") if p.role == "coordinator" else p
        for p in pods
    ]
    plan = tick(job, running_status(), pods)
    assert plan.status.phase is Phase.SUCCEEDED
    assert plan.status.generation_replicas == 0


def test_spec_accepted_names_the_refused_field_then_clears() -> None:
    refused = spec_accepted(
        running_status(), ["spec.generation.replicas: must be >= 1 (1..1024)"], NOW, 3
    )
    found = condition(refused, ConditionType.SPEC_ACCEPTED)
    assert found is not None and found.status.value == "False"
    assert found.reason == "UpdateRejected" and "spec.generation.replicas" in found.message
    assert found.observed_generation == 3
    later = NOW + datetime.timedelta(seconds=5)
    accepted = spec_accepted(refused, [], later, 4)
    cleared = condition(accepted, ConditionType.SPEC_ACCEPTED)
    assert cleared is not None and cleared.status.value == "True"
    assert cleared.last_transition_time == "2026-01-01T12:00:05Z"
    assert (
        condition(refused, ConditionType.SPEC_ACCEPTED) == found
    )  # the input status is not changed


def test_the_last_accepted_spec_survives_an_invalid_live_spec() -> None:
    job = make_job(2)
    annotations = {updates.APPLIED_SPEC_ANNOTATION: updates.pin(job.spec)}
    pinned = updates.last_accepted("tiny-grpo", "ns", {"annotations": annotations})
    assert pinned is not None and pinned.spec == job.spec
    assert (pinned.name, pinned.namespace) == ("tiny-grpo", "ns")
    assert updates.last_accepted("tiny-grpo", "ns", {}) is None  # nothing pinned
    broken = {updates.APPLIED_SPEC_ANNOTATION: '{"generation": {"replicas": 0}}'}
    assert updates.last_accepted("tiny-grpo", "ns", {"annotations": broken}) is None


def test_the_timer_tracks_refusals_of_the_live_spec() -> None:
    job = make_job(2)
    pinned = job.spec.to_wire()
    assert updates.refused_changes(pinned, job.spec) == []
    # Nothing ever refused: no condition at all.
    assert condition(track(running_status(), [], NOW, 1), ConditionType.SPEC_ACCEPTED) is None
    changed = make_job(2).spec.model_copy(update={"image": "example.com/other:1"})
    (refusal,) = updates.refused_changes(pinned, changed)
    assert refusal.startswith("spec.image cannot change while the job exists")
    refused = track(running_status(), [refusal], NOW, 2)
    found = condition(refused, ConditionType.SPEC_ACCEPTED)
    assert found is not None and found.status.value == "False" and "spec.image" in found.message
    # Scaling is a mutable change: not refused, and the condition turns True.
    scaled = make_job(5).spec
    assert updates.refused_changes(pinned, scaled) == []
    cleared = condition(track(refused, [], NOW, 3), ConditionType.SPEC_ACCEPTED)
    assert cleared is not None and cleared.status.value == "True"
