"""kubectl apply an RLHFJob -> the operator creates every child; bad input creates nothing.

Runs the real ``rlhfspec operator`` against the emulator (see ``conftest``); every check goes
through kubectl, as a user would look.
"""

from __future__ import annotations

import base64
import json
import urllib.request

import yaml
from cluster import Cluster, example_job

from rlhfspec_api.manifest import parse_rlhfjob

CHILDREN = {
    "configmap": ["tiny-grpo-config"],
    "secret": ["tiny-grpo-kv", "tiny-grpo-redis"],
    "networkpolicy": ["tiny-grpo-redis", "tiny-grpo-workers"],
    "deployment": ["tiny-grpo-redis"],
    "service": [
        "tiny-grpo-coordinator",
        "tiny-grpo-generation",
        "tiny-grpo-inference",
        "tiny-grpo-redis",
        "tiny-grpo-trainer",
    ],
    "persistentvolumeclaim": ["tiny-grpo-storage"],
    "pod": [
        "tiny-grpo-coordinator",
        "tiny-grpo-generation-0",
        "tiny-grpo-generation-1",
        "tiny-grpo-inference",
        "tiny-grpo-trainer",
    ],
}


def test_apply_creates_every_child_with_the_right_spec(cluster: Cluster, namespace: str) -> None:
    doc = example_job("tiny-grpo", namespace)
    doc["spec"]["generation"]["replicas"] = 2
    doc["spec"]["generation"]["resources"] = {"cpu": 2, "memory": "8Gi", "gpu": 1}
    cluster.apply(doc)
    status = cluster.wait_for_phase("tiny-grpo", namespace, "Initializing")
    assert status["progress"] == "0/4" and status["restarts"] == 0
    job = cluster.get("rlhfjob", "tiny-grpo", namespace)
    assert job is not None
    uid = job["metadata"]["uid"]

    def children_exist() -> bool:
        return all(cluster.names(kind, namespace) == names for kind, names in CHILDREN.items())

    cluster.wait_for(children_exist, "every child")
    for kind, names in CHILDREN.items():
        for name in names:
            obj = cluster.get(kind, name, namespace)
            assert obj is not None
            meta = obj["metadata"]
            assert meta["ownerReferences"][0]["uid"] == uid, (kind, name)
            assert meta["labels"]["rlhfspec.io/job"] == "tiny-grpo"
            assert "rlhfspec.io/role" in meta["labels"]

    stored = yaml.safe_load(
        cluster.jsonpath("configmap", "tiny-grpo-config", namespace, "{.data.job\\.yaml}")
    )
    assert parse_rlhfjob(stored).spec == parse_rlhfjob(doc).spec
    password = cluster.jsonpath("secret", "tiny-grpo-redis", namespace, "{.data.password}")
    assert len(base64.b64decode(password)) >= 32

    pod = cluster.get("pod", "tiny-grpo-generation-1", namespace)
    assert pod is not None
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["rlhfspec", "worker", "generation"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["RLHFSPEC_WORKER_INDEX"] == "1" and env["RLHFSPEC_REPLICAS"] == "2"
    assert env["RLHFSPEC_REDIS_PASSWORD"]["secretKeyRef"]["name"] == "tiny-grpo-redis"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    # Events: one Created per child, and the phase change.
    def created() -> list[str]:
        messages = sorted(
            e["message"] for e in cluster.events(namespace) if e["reason"] == "Created"
        )
        return messages if len(messages) == sum(len(n) for n in CHILDREN.values()) else []

    messages = cluster.wait_for(created, "a Created event per child")
    assert "Created Pod tiny-grpo-trainer" in messages
    assert "Created PersistentVolumeClaim tiny-grpo-storage" in messages
    assert "Initializing" in cluster.event_reasons(namespace)

    # Printer columns (server-side table) and describe show what is going on.
    table = cluster.kubectl("get", "rlhfjobs", "-n", namespace)
    assert table.splitlines()[0].split()[:4] == ["NAME", "PHASE", "ITER", "STRATEGY"]
    assert table.splitlines()[1].split()[:3] == ["tiny-grpo", "Initializing", "0/4"]
    described = cluster.kubectl("describe", "rlhfjob", "tiny-grpo", "-n", namespace)
    assert "PodsReady" in described and "Created Pod tiny-grpo-coordinator" in described


def test_invalid_manifest_fails_with_validation_failed_and_creates_nothing(
    cluster: Cluster, namespace: str
) -> None:
    doc = example_job("bad-ppo", namespace)
    doc["spec"]["algorithm"]["name"] = "ppo"  # ppo without a critic: a cross-field rule
    cluster.apply(doc)
    status = cluster.wait_for_phase("bad-ppo", namespace, "Failed")
    assert status["reason"] == "ValidationFailed"
    assert "spec.models.critic: ppo needs a critic model" in status["message"]
    failed = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert failed and failed[0]["reason"] == "ValidationFailed"

    def warned() -> list[dict[str, str]]:
        return [e for e in cluster.events(namespace) if e["reason"] == "ValidationFailed"]

    (event,) = cluster.wait_for(warned, "the ValidationFailed event")
    assert event["type"] == "Warning" and "spec.models.critic" in event["message"]
    for kind in ("pods", "configmaps", "secrets", "services", "deployments"):
        assert cluster.names(kind, namespace) == [], kind


def test_unknown_fields_that_reach_the_operator_are_rejected_by_name(
    cluster: Cluster, namespace: str
) -> None:
    # A real API server prunes/rejects unknown fields with the CRD's structural schema; the
    # emulator stores them, so this checks the operator's own guard behind it.
    doc = example_job("typo", namespace)
    doc["spec"]["generation"]["replcas"] = 2
    cluster.apply(doc)
    status = cluster.wait_for_phase("typo", namespace, "Failed")
    assert status["reason"] == "ValidationFailed"
    assert "spec.generation.replcas" in status["message"]
    assert cluster.names("pods", namespace) == []


def test_a_local_storage_path_is_rejected_on_a_cluster(cluster: Cluster, namespace: str) -> None:
    doc = example_job("local", namespace, storage={"path": "/tmp/ckpt"})
    cluster.apply(doc)
    status = cluster.wait_for_phase("local", namespace, "Failed")
    assert status["message"].startswith("spec.storage.path: ")


def test_liveness_endpoint_answers(cluster: Cluster) -> None:
    url = f"http://127.0.0.1:{cluster.liveness_port}/healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        json.loads(response.read() or b"{}")


def test_metrics_endpoint_exports_job_gauges(cluster: Cluster, namespace: str) -> None:
    cluster.apply(example_job("metered", namespace))
    cluster.wait_for_phase("metered", namespace, "Initializing")
    url = f"http://127.0.0.1:{cluster.metrics_port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return text if f'namespace="{namespace}",job="metered"' in text else ""

    text = cluster.wait_for(scrape, "the job in /metrics")
    labels = f'namespace="{namespace}",job="metered"'
    assert f'rlhfspec_job_phase{{{labels},phase="Initializing"}} 1' in text
    assert f"rlhfspec_job_total_iterations{{{labels}}} 4" in text
    assert "rlhfspec_operator_reconciles_total " in text
