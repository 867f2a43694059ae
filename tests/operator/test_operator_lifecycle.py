"""Pod phases drive the job: Running, Succeeded, backoff, deadlines, suspend/resume, scaling.

The test stands in for the kubelet by patching pod status with kubectl; the operator (a real
``rlhfspec operator`` process) must react with the right phase, conditions, events and pods.
"""

from __future__ import annotations

import json
from typing import Any

from cluster import Cluster, example_job

JOB = "tiny-grpo"


def worker_pods(cluster: Cluster, namespace: str) -> list[str]:
    return cluster.pod_names(namespace, JOB)


def start_running(cluster: Cluster, namespace: str, **spec: Any) -> None:
    """Apply the example job, wait for its pods, mark them Running, wait for phase Running."""
    cluster.apply(example_job(JOB, namespace, **spec))
    cluster.wait_for(lambda: len(worker_pods(cluster, namespace)) == 4, "4 worker pods")
    for pod in worker_pods(cluster, namespace):
        cluster.set_pod_status(namespace, pod, "Running")
    cluster.wait_for_phase(JOB, namespace, "Running")


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def uid(cluster: Cluster, kind: str, name: str, namespace: str) -> str | None:
    obj = cluster.get(kind, name, namespace)
    return None if obj is None else str(obj["metadata"]["uid"])


def terminated(reason: str, code: int) -> dict[str, Any]:
    return {
        "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"reason": reason, "exitCode": code}}}
        ]
    }


def test_pod_phases_drive_phase_conditions_and_events(cluster: Cluster, namespace: str) -> None:
    start_running(cluster, namespace)
    status = cluster.status(JOB, namespace)
    ready = conditions(status)["PodsReady"]
    assert ready["status"] == "True" and ready["reason"] == "AllPodsRunning"
    assert conditions(status)["Progressing"]["status"] == "True"
    assert status["startTime"] and status["observedGeneration"] == 1
    # Managed Redis is unreachable from this test operator: the status says so.
    reachable = conditions(status)["CoordinatorReachable"]
    assert reachable["status"] == "False" and reachable["reason"] == "RedisUnavailable"

    cluster.set_pod_status(namespace, f"{JOB}-coordinator", "Succeeded")
    status = cluster.wait_for_phase(JOB, namespace, "Succeeded")
    assert status["reason"] == "Completed" and status["completionTime"]
    assert conditions(status)["Succeeded"]["status"] == "True"
    assert conditions(status)["Progressing"]["status"] == "False"
    # The finished coordinator stays (its logs); the others are freed.
    cluster.wait_for(
        lambda: worker_pods(cluster, namespace) == [f"{JOB}-coordinator"],
        "only the coordinator pod left",
    )
    reasons = cluster.wait_for(
        lambda: (r := cluster.event_reasons(namespace)) and "Succeeded" in r and r,
        "the Succeeded event",
    )
    assert {"Initializing", "Running", "Succeeded"} <= set(reasons)


def test_failed_pod_is_recreated_until_the_backoff_limit(cluster: Cluster, namespace: str) -> None:
    start_running(cluster, namespace, backoffLimit=1)
    trainer = f"{JOB}-trainer"
    first_uid = uid(cluster, "pod", trainer, namespace)
    cluster.set_pod_status(namespace, trainer, "Failed", **terminated("OOMKilled", 137))

    def recreated() -> bool:
        new_uid = uid(cluster, "pod", trainer, namespace)
        return new_uid is not None and new_uid != first_uid

    cluster.wait_for(recreated, "the trainer pod recreated")
    status = cluster.wait_for_phase(JOB, namespace, "Initializing")
    assert status["restarts"] == 1
    (failed_event,) = [e for e in cluster.events(namespace) if e["reason"] == "PodFailed"]
    assert failed_event["type"] == "Warning"
    assert "OOMKilled (exit code 137)" in failed_event["message"]
    assert "resumes from its last checkpoint" in failed_event["message"]

    cluster.set_pod_status(namespace, trainer, "Running")
    cluster.wait_for_phase(JOB, namespace, "Running")
    cluster.set_pod_status(namespace, trainer, "Failed", **terminated("Error", 1))
    status = cluster.wait_for_phase(JOB, namespace, "Failed")
    assert status["reason"] == "BackoffLimitExceeded"
    assert (
        f"pod {trainer} failed: container trainer terminated: Error (exit code 1)"
        in (status["message"])
    )
    assert conditions(status)["Failed"]["reason"] == "BackoffLimitExceeded"
    # Active pods are deleted to free the nodes; the failed one is kept for its logs.
    cluster.wait_for(lambda: worker_pods(cluster, namespace) == [trainer], "only the failed pod")
    described = cluster.kubectl("describe", "rlhfjob", JOB, "-n", namespace)
    assert "BackoffLimitExceeded" in described and "PodFailed" in described


def test_active_deadline_fails_the_job(cluster: Cluster, namespace: str) -> None:
    cluster.apply(example_job(JOB, namespace, activeDeadlineSeconds=2))
    status = cluster.wait_for_phase(JOB, namespace, "Failed")
    assert status["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds (2s)" in status["message"]
    cluster.wait_for(lambda: worker_pods(cluster, namespace) == [], "pods deleted")


def test_stuck_initializing_fails_fast_with_the_pods_reason(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(example_job(JOB, namespace, startupDeadlineSeconds=600))
    cluster.wait_for(lambda: len(worker_pods(cluster, namespace)) == 4, "4 worker pods")
    waiting = {
        "containerStatuses": [
            {
                "name": "trainer",
                "state": {
                    "waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}
                },
            }
        ]
    }
    cluster.set_pod_status(namespace, f"{JOB}-trainer", "Pending", **waiting)
    detail = "tiny-grpo-trainer: Pending (container trainer waiting: ImagePullBackOff"
    cluster.wait_for(
        lambda: detail in conditions(cluster.status(JOB, namespace))["PodsReady"]["message"],
        "PodsReady naming the trainer's waiting reason",
    )
    # The deadline is mutable: shortening it is the deterministic way to pass it.
    cluster.kubectl(
        "patch",
        "rlhfjob",
        JOB,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"startupDeadlineSeconds":1}}',
    )
    status = cluster.wait_for_phase(JOB, namespace, "Failed")
    assert status["reason"] == "StartupDeadlineExceeded"
    assert detail in status["message"]
    assert "StartupDeadlineExceeded" in cluster.event_reasons(namespace)


def state_uids(cluster: Cluster, namespace: str) -> dict[str, str | None]:
    """What a suspension must keep: Redis (its state), its password, storage and config."""
    children = [
        ("deployment", f"{JOB}-redis"),
        ("secret", f"{JOB}-redis"),
        ("persistentvolumeclaim", f"{JOB}-storage"),
        ("configmap", f"{JOB}-config"),
    ]
    return {kind: uid(cluster, kind, name, namespace) for kind, name in children}


def test_suspend_keeps_state_and_resume_recreates_pods(cluster: Cluster, namespace: str) -> None:
    start_running(cluster, namespace)
    kept = state_uids(cluster, namespace)
    cluster.kubectl(
        "patch", "rlhfjob", JOB, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    status = cluster.wait_for_phase(JOB, namespace, "Suspended")
    assert conditions(status)["Suspended"]["status"] == "True"
    cluster.wait_for(lambda: worker_pods(cluster, namespace) == [], "worker pods deleted")
    assert state_uids(cluster, namespace) == kept  # Redis, password, storage untouched

    cluster.kubectl(
        "patch", "rlhfjob", JOB, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    cluster.wait_for(lambda: len(worker_pods(cluster, namespace)) == 4, "pods recreated")
    status = cluster.wait_for_phase(JOB, namespace, "Initializing")
    assert conditions(status)["Suspended"]["status"] == "False"
    for pod in worker_pods(cluster, namespace):
        cluster.set_pod_status(namespace, pod, "Running")
    cluster.wait_for_phase(JOB, namespace, "Running")
    reasons = cluster.event_reasons(namespace)
    assert "Suspended" in reasons and reasons.count("Running") == 2


def test_scaling_generation_replicas_adds_and_removes_pods(
    cluster: Cluster, namespace: str
) -> None:
    start_running(cluster, namespace)

    def generation_pods() -> list[str]:
        return [p for p in worker_pods(cluster, namespace) if "-generation-" in p]

    def scale(replicas: int) -> None:
        body = json.dumps({"spec": {"generation": {"replicas": replicas}}})
        cluster.kubectl("patch", "rlhfjob", JOB, "-n", namespace, "--type=merge", "-p", body)

    def config() -> str:
        return str(cluster.peek("v1/configmaps", namespace)[f"{JOB}-config"]["data"]["job.yaml"])

    scale(3)
    expected = [f"{JOB}-generation-{i}" for i in range(3)]
    cluster.wait_for(lambda: generation_pods() == expected, "3 replicas")
    cluster.wait_for(lambda: "replicas: 3" in config(), "job.yaml re-rendered with 3 replicas")
    assert cluster.names("pods", namespace, "rlhfspec.io/role=generation") == expected
    scale(1)
    cluster.wait_for(lambda: generation_pods() == [f"{JOB}-generation-0"], "back to 1 replica")
    cluster.wait_for_phase(JOB, namespace, "Running")
    assert cluster.event_reasons(namespace).count("ScaledDown") == 2


def test_changing_an_immutable_field_is_rejected_with_an_event(
    cluster: Cluster, namespace: str
) -> None:
    start_running(cluster, namespace)
    cluster.kubectl(
        "patch",
        "rlhfjob",
        JOB,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"image":"example.com/other:1"}}',
    )

    def rejected() -> list[dict[str, Any]]:
        return [e for e in cluster.events(namespace) if e["reason"] == "UpdateRejected"]

    (event,) = cluster.wait_for(rejected, "the UpdateRejected event")
    assert event["type"] == "Warning" and "spec.image cannot change" in event["message"]
    # A pod recreated later still runs the image the job started with.
    cluster.kubectl("delete", "pod", f"{JOB}-inference", "-n", namespace)
    image = cluster.wait_for(
        lambda: cluster.jsonpath(
            "pod", f"{JOB}-inference", namespace, "{.spec.containers[0].image}"
        ),
        "the inference pod recreated",
    )
    assert image == "ghcr.io/rlhfspec/worker-cpu:0.1.0"
