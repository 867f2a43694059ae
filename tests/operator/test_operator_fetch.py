"""A job with an hf:// model on the emulated cluster: every worker pod the operator creates
fetches first (an init container with the token from the named Secret), and the job's
``ModelsReady`` condition follows the init containers' statuses the test writes as the kubelet
would: Fetching, then FetchFailed quoting the URI and HTTP status from the termination message
(the failed pod is recreated, counted against backoffLimit), then Fetched with the size and
time the finished fetch reported.
"""

from __future__ import annotations

from typing import Any

from cluster import Cluster, example_job

JOB = "tiny-grpo"
POLICY = "hf://org/tiny-policy@v1"
FAILURE = (
    "fetch failed: spec.models.policy.path: hf://org/tiny-policy@v1: download from the hub "
    "failed: HTTP 404: Repository Not Found"
)


def _init(state: dict[str, Any]) -> dict[str, Any]:
    return {"initContainerStatuses": [{"name": "fetch", "state": state}]}


def _models_ready(cluster: Cluster, namespace: str) -> dict[str, Any] | None:
    conditions = cluster.status(JOB, namespace).get("conditions", [])
    return next((c for c in conditions if c["type"] == "ModelsReady"), None)


def _wait_models_ready(cluster: Cluster, namespace: str, reason: str) -> dict[str, Any]:
    def probe() -> dict[str, Any]:
        found = _models_ready(cluster, namespace)
        return found if found is not None and found["reason"] == reason else {}

    return cluster.wait_for(probe, f"ModelsReady {reason}")


def test_models_ready_follows_the_fetch_init_containers(cluster: Cluster, namespace: str) -> None:
    job = example_job(JOB, namespace, credentials={"hfToken": {"name": "hf", "key": "token"}})
    job["spec"]["models"]["policy"]["path"] = POLICY
    cluster.apply(job)

    def four_pods() -> list[str]:
        names = cluster.pod_names(namespace, JOB)
        return names if len(names) == 4 else []

    pods = cluster.wait_for(four_pods, "4 worker pods")
    for name in pods:
        pod = cluster.get("pod", name, namespace)
        assert pod is not None
        [init] = pod["spec"]["initContainers"]
        assert init["name"] == "fetch" and init["command"] == ["rlhfspec", "worker", "fetch"]
        token = {e["name"]: e for e in init["env"]}["HF_TOKEN"]
        assert token["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}

    pending = _wait_models_ready(cluster, namespace, "Pending")
    assert pending["status"] == "False" and POLICY in pending["message"]

    generation = f"{JOB}-generation-0"
    cluster.set_pod_status(namespace, generation, "Pending", **_init({"running": {}}))
    fetching = _wait_models_ready(cluster, namespace, "Fetching")
    assert fetching["status"] == "False" and "1 pod(s) fetching" in fetching["message"]

    coordinator = f"{JOB}-coordinator"
    failed_state = {"terminated": {"exitCode": 1, "reason": "Error", "message": FAILURE + "\n"}}
    cluster.set_pod_status(namespace, coordinator, "Failed", **_init(failed_state))
    failed = _wait_models_ready(cluster, namespace, "FetchFailed")
    assert failed["status"] == "False"
    assert failed["message"] == (
        f"pod {coordinator}: spec.models.policy.path: hf://org/tiny-policy@v1: download from "
        "the hub failed: HTTP 404: Repository Not Found"
    )
    # The failed pod counts as a restart, and its event quotes the same failure.
    cluster.wait_for(
        lambda: any(
            e["reason"] == "PodFailed" and "HTTP 404" in e["message"]
            for e in cluster.events(namespace)
        ),
        "a PodFailed event quoting the HTTP status",
    )
    cluster.wait_for(lambda: cluster.status(JOB, namespace).get("restarts") == 1, "1 restart")

    summary = f"fetched: {POLICY} (downloaded 16.2 MiB in 4.1s)\n"
    done = {"terminated": {"exitCode": 0, "reason": "Completed", "message": summary}}
    cluster.set_pod_status(namespace, generation, "Running", **_init(done))
    fetched = _wait_models_ready(cluster, namespace, "Fetched")
    assert fetched["status"] == "True"
    assert fetched["message"] == f"pod {generation}: {POLICY} (downloaded 16.2 MiB in 4.1s)"
