"""Pod template overrides, Kueue gang metadata, TTL after finish and the deadline on resume,
through the real operator against the emulator, driven with kubectl.

What the operator writes is read back as a user would (``kubectl get -o json``): the pods of a
job created suspended with a Kueue queue label carry the queue, the pod group and its size,
the overrides and the operator's unchanged security context once the job is unsuspended; a
finished job's children go when its TTL passes (a claim the user brought stays); the
activeDeadlineSeconds clock restarts when a suspended job resumes.
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

from cluster import RLHFJOBS, Cluster, example_job

JOB = "tiny-grpo"
QUEUE = "kueue.x-k8s.io/queue-name"
OVERRIDES: dict[str, Any] = {
    "default": {
        "nodeSelector": {"pool": "rl"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "rl", "effect": "NoSchedule"}
        ],
        "labels": {"team": "rl"},
        "env": [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
        ],
    },
    "generation": {
        "priorityClassName": "rl-high",
        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "model-cache"}}],
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    },
    "coordinator": {"nodeSelector": {"pool": "cpu"}},
}


def hf_secret(namespace: str, opted_in: bool) -> dict[str, Any]:
    labels = {"rlhfspec.io/pod-secret": "true"} if opted_in else {}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf", "namespace": namespace, "labels": labels},
        "stringData": {"token": "hf_test_token"},
    }


def patch_spec(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = json.dumps({"spec": spec})
    cluster.kubectl("patch", "rlhfjob", name, "-n", namespace, "--type=merge", "-p", body)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def parse_time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_a_suspended_kueue_job_starts_on_resume_with_its_gang_labels_and_overrides(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(hf_secret(namespace, opted_in=True))
    doc = example_job(JOB, namespace, suspend=True, podTemplateOverrides=OVERRIDES)
    doc["metadata"]["labels"] = {QUEUE: "team-a"}
    cluster.apply(doc)
    status = cluster.wait_for_phase(JOB, namespace, "Suspended")
    assert conditions(status)["Suspended"]["status"] == "True"
    assert cluster.pod_names(namespace, JOB) == []  # nothing runs before it is unsuspended

    patch_spec(cluster, namespace, JOB, {"suspend": False})
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, JOB)) == 4, "4 worker pods")
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
    by_name = {p["metadata"]["name"]: p for p in pods}
    assert sorted(by_name) == [
        f"{JOB}-coordinator",
        f"{JOB}-generation-0",
        f"{JOB}-inference",
        f"{JOB}-trainer",
    ]
    for name, pod in by_name.items():
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        assert meta["labels"][QUEUE] == "team-a", name
        assert meta["labels"]["kueue.x-k8s.io/pod-group-name"] == JOB, name
        assert meta["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "4", name
        assert meta["labels"]["team"] == "rl" and meta["labels"]["rlhfspec.io/job"] == JOB
        assert {"key": "dedicated", "operator": "Equal", "value": "rl", "effect": "NoSchedule"} in (
            spec["tolerations"]
        )
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
        assert env["RLHFSPEC_ROLE"]["value"] == meta["labels"]["rlhfspec.io/role"]
        assert container["command"][:2] == ["rlhfspec", "worker"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["securityContext"]["runAsNonRoot"] is True
    assert by_name[f"{JOB}-coordinator"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    generation = by_name[f"{JOB}-generation-0"]
    assert generation["spec"]["nodeSelector"] == {"pool": "rl"}
    assert generation["spec"]["priorityClassName"] == "rl-high"
    mounts = generation["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in mounts
    assert "priorityClassName" not in by_name[f"{JOB}-trainer"]["spec"]
    # The managed Redis is placed like the coordinator, outside the gang.
    redis = cluster.get("deployment", f"{JOB}-redis", namespace)
    assert redis is not None
    template = redis["spec"]["template"]
    assert template["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert QUEUE not in template["metadata"]["labels"]


def test_an_override_of_the_operators_fields_fails_the_job_naming_them(
    cluster: Cluster, namespace: str
) -> None:
    bad = {
        "trainer": {
            "command": ["sh"],
            "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf"}}}],
        }
    }
    cluster.apply(example_job(JOB, namespace, podTemplateOverrides=bad))
    status = cluster.wait_for_phase(JOB, namespace, "Failed")
    assert status["reason"] == "ValidationFailed"
    failed = conditions(status)["Failed"]
    assert "spec.podTemplateOverrides.trainer.command: the operator owns" in failed["message"]
    assert cluster.pod_names(namespace, JOB) == []
    assert cluster.peek("v1/configmaps", namespace) == {}  # nothing was created


def test_a_secret_handed_to_pods_without_the_opt_in_label_fails_the_job(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(hf_secret(namespace, opted_in=False))
    cluster.apply(example_job(JOB, namespace, podTemplateOverrides=OVERRIDES))
    status = cluster.wait_for_phase(JOB, namespace, "Failed")
    assert status["reason"] == "NotAllowed"
    field = "spec.podTemplateOverrides.default.env[0].valueFrom.secretKeyRef.name"
    assert (
        f"{field}: Secret 'hf' does not carry the label rlhfspec.io/pod-secret=true"
        in (status["message"])
    )
    assert cluster.pod_names(namespace, JOB) == []


def _children(cluster: Cluster, namespace: str, job: str) -> list[str]:
    """Every object of the namespace named after ``job`` (its children), as kind/name."""
    found = []
    for resource in (
        "v1/pods",
        "v1/services",
        "v1/configmaps",
        "v1/secrets",
        "v1/persistentvolumeclaims",
        "apps/v1/deployments",
        "networking.k8s.io/v1/networkpolicies",
    ):
        for name in cluster.peek(resource, namespace):
            if name.startswith(f"{job}-"):
                found.append(f"{resource.rsplit('/', 1)[1]}/{name}")
    return sorted(found)


def _finish(cluster: Cluster, namespace: str, job: str) -> dict[str, Any]:
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, job)) == 4, f"{job}'s pods")
    for pod in cluster.pod_names(namespace, job):
        cluster.set_pod_status(namespace, pod, "Running")
    cluster.wait_for_phase(job, namespace, "Running")
    cluster.set_pod_status(namespace, f"{job}-coordinator", "Succeeded")
    return cluster.wait_for_phase(job, namespace, "Succeeded")


def test_ttl_after_finished_deletes_the_children_and_keeps_the_users_claim(
    cluster: Cluster, namespace: str
) -> None:
    user_claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "shared-checkpoints", "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    cluster.apply(user_claim)
    owned, brought = "owned-claim", "user-claim"
    ttl = 3
    cluster.apply(example_job(owned, namespace, ttlSecondsAfterFinished=ttl))
    cluster.apply(
        example_job(
            brought,
            namespace,
            ttlSecondsAfterFinished=ttl,
            storage={"claimName": "shared-checkpoints"},
        )
    )
    finished = {}
    for job in (owned, brought):
        status = _finish(cluster, namespace, job)
        finished[job] = parse_time(status["completionTime"])
        # Right after finishing: the finished coordinator (its logs), config, Redis are there.
        children = _children(cluster, namespace, job)
        assert f"pods/{job}-coordinator" in children, children
        assert f"configmaps/{job}-config" in children and f"deployments/{job}-redis" in children
        assert f"secrets/{job}-kv" in children and f"services/{job}-trainer" in children
        owned_claim = f"persistentvolumeclaims/{job}-storage"
        assert (owned_claim in children) == (job == owned)

    for job in (owned, brought):
        cluster.wait_for(lambda job=job: _children(cluster, namespace, job) == [], f"{job} empty")
        status = cluster.status(job, namespace)
        done = conditions(status)["ChildrenDeleted"]
        assert done["status"] == "True" and done["reason"] == "TTLExpired"
        # Timestamps have whole seconds: the TTL may pass up to 1 s early on paper.
        waited = parse_time(done["lastTransitionTime"]) - finished[job]
        assert waited >= datetime.timedelta(seconds=ttl - 1)
        assert status["phase"] == "Succeeded"  # the job itself stays (ttlDeletesJob is false)
    assert cluster.get("pvc", "shared-checkpoints", namespace) is not None
    messages = [e["message"] for e in cluster.events(namespace) if e["reason"] == "TTLExpired"]
    assert len(messages) == 2
    assert any(f"PersistentVolumeClaim {owned}-storage" in m for m in messages)
    assert not any("shared-checkpoints" in m for m in messages)


def test_active_deadline_restarts_when_a_suspended_job_resumes(
    cluster: Cluster, namespace: str
) -> None:
    deadline = 4
    cluster.apply(example_job(JOB, namespace, suspend=True, activeDeadlineSeconds=deadline))
    cluster.wait_for_phase(JOB, namespace, "Suspended")
    time.sleep(deadline + 1)  # suspended for longer than the deadline: that time does not count
    assert cluster.status(JOB, namespace)["phase"] == "Suspended"
    resumed = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    patch_spec(cluster, namespace, JOB, {"suspend": False})
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, JOB)) == 4, "pods recreated")
    status = cluster.wait_for_phase(JOB, namespace, "Initializing")
    started = parse_time(status["startTime"])
    assert started >= resumed
    status = cluster.wait_for_phase(JOB, namespace, "Failed")
    assert status["reason"] == "DeadlineExceeded"
    assert parse_time(status["completionTime"]) - started >= datetime.timedelta(seconds=deadline)


def test_a_ttl_set_after_the_finish_applies_and_can_delete_the_job(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(example_job(JOB, namespace))
    _finish(cluster, namespace, JOB)
    assert f"configmaps/{JOB}-config" in _children(cluster, namespace, JOB)
    # Like a Kubernetes Job's, the TTL is mutable, also once the job has finished.
    patch_spec(cluster, namespace, JOB, {"ttlSecondsAfterFinished": 0, "ttlDeletesJob": True})
    cluster.wait_for(lambda: JOB not in cluster.peek(RLHFJOBS, namespace), "the job deleted")
    cluster.wait_for(lambda: _children(cluster, namespace, JOB) == [], "its children deleted")


GATED = {
    "conditions": [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "SchedulingGated",
            "message": "Scheduling is blocked due to non-empty scheduling gates",
        }
    ]
}


def test_a_job_waiting_for_kueue_admission_is_queued_not_past_its_startup_deadline(
    cluster: Cluster, namespace: str
) -> None:
    deadline = 3
    doc = example_job(JOB, namespace, startupDeadlineSeconds=deadline)
    doc["metadata"]["labels"] = {QUEUE: "team-a"}
    cluster.apply(doc)
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, JOB)) == 4, "4 worker pods")
    for pod in cluster.pod_names(namespace, JOB):  # Kueue's webhook gates the whole gang
        cluster.set_pod_status(namespace, pod, "Pending", **GATED)
    cluster.wait_for(
        lambda: (
            conditions(cluster.status(JOB, namespace)).get("Queued", {}).get("status") == "True"
        ),
        "the Queued condition",
    )
    time.sleep(deadline + 2)  # queued longer than the startup deadline: that does not count
    status = cluster.status(JOB, namespace)
    assert (status["phase"], status["reason"]) == ("Initializing", "Queued")
    assert conditions(status)["Queued"]["reason"] == "WaitingForAdmission"

    # Admitted: the gates go, the pods wait for nodes; the deadline counts from here.
    for pod in cluster.pod_names(namespace, JOB):
        cluster.set_pod_status(namespace, pod, "Pending", conditions=[])
    status = cluster.wait_for_phase(JOB, namespace, "Failed")
    assert status["reason"] == "StartupDeadlineExceeded"
    admitted = conditions(status)["Queued"]
    assert admitted["status"] == "False" and admitted["reason"] == "Admitted"
    waited = parse_time(status["completionTime"]) - parse_time(admitted["lastTransitionTime"])
    assert waited >= datetime.timedelta(seconds=deadline - 1)  # whole-second timestamps
