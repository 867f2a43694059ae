"""The coordinator's progress in Redis -> the job's status and printer columns; delete cleanup.

These jobs use an *external* Redis (a real redis-server with a password in a user Secret), the
one Redis the test operator can reach: it exercises the external mode, reading the user's
Secret, and the cleanup of the job's keys that nothing else owns.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from cluster import (
    Cluster,
    example_job,
    external_coordinator,
    redis_password_secret,
)

from rlhfspec_workers.messages import JobProgress, Keys

JOB = "tiny-grpo"


def external_job(cluster: Cluster, namespace: str, server: redis.Redis, **spec: Any) -> None:
    port = server.connection_pool.connection_kwargs["port"]
    cluster.apply(redis_password_secret(namespace))
    coordinator = external_coordinator(f"redis://127.0.0.1:{port}/0")
    cluster.apply(example_job(JOB, namespace, coordinator=coordinator, **spec))
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, JOB)) == 4, "4 worker pods")
    for pod in cluster.pod_names(namespace, JOB):
        cluster.set_pod_status(namespace, pod, "Running")
    cluster.wait_for_phase(JOB, namespace, "Running")


def write_progress(server: redis.Redis, namespace: str, **fields: Any) -> None:
    progress = JobProgress(updated_at=time.time(), **fields)
    server.set(Keys(namespace, JOB).progress, progress.to_bytes())


def test_progress_from_redis_fills_the_status_and_printer_columns(
    cluster: Cluster, namespace: str, redis_server: redis.Redis
) -> None:
    external_job(cluster, namespace, redis_server)
    assert cluster.names("deployments", namespace) == []  # no managed Redis
    env = cluster.jsonpath(
        "pod",
        f"{JOB}-trainer",
        namespace,
        "{.spec.containers[0].env[?(@.name=='RLHFSPEC_REDIS_URL')].value}",
    )
    assert env.startswith("redis://127.0.0.1:")
    write_progress(
        redis_server,
        namespace,
        iteration=2,
        total_iterations=4,
        tokens_per_second=1234.5,
        mean_accepted_length=2.7,
        strategy="suffix:k=4",
        strategy_table_version=3,
        migrations=5,
        reward_mean=0.42,
        kl=0.01,
        weight_version=2,
    )
    status = cluster.wait_for(
        lambda: (s := cluster.status(JOB, namespace)).get("progress") == "2/4" and s,
        "progress 2/4 in the status",
    )
    assert status["generation"] == {
        "tokensPerSecond": 1234.5,
        "meanAcceptedLength": 2.7,
        "strategy": "suffix:k=4",
        "strategyTableVersion": 3,
        "migrations": 5,
        "weightVersion": 2,
    }
    assert status["rewardMean"] == 0.42 and status["kl"] == 0.01 and status["iteration"] == 2
    reachable = {c["type"]: c for c in status["conditions"]}["CoordinatorReachable"]
    assert reachable["status"] == "True" and reachable["reason"] == "Connected"
    row = cluster.kubectl("get", "rlhfjobs", JOB, "-n", namespace).splitlines()[1].split()
    assert row[:7] == [JOB, "Running", "2/4", "suffix:k=4", "1234.5", "2.7", "0.42"]

    write_progress(
        redis_server, namespace, iteration=4, total_iterations=4, state="succeeded", reward_mean=0.9
    )
    cluster.set_pod_status(namespace, f"{JOB}-coordinator", "Succeeded")
    status = cluster.wait_for_phase(JOB, namespace, "Succeeded")
    assert status["progress"] == "4/4" and status["rewardMean"] == 0.9
    assert "4/4 iterations" in status["message"]


def test_a_collapsed_drafter_in_the_progress_becomes_the_drafter_collapsed_condition(
    cluster: Cluster, namespace: str, redis_server: redis.Redis
) -> None:
    external_job(cluster, namespace, redis_server)

    def drafter_condition() -> dict[str, Any] | None:
        conditions = cluster.status(JOB, namespace).get("conditions", [])
        return next((c for c in conditions if c["type"] == "DrafterCollapsed"), None)

    write_progress(redis_server, namespace, iteration=1, total_iterations=4)
    cluster.wait_for(lambda: cluster.status(JOB, namespace).get("progress") == "1/4", "1/4")
    assert drafter_condition() is None  # never collapsed: no condition at all

    write_progress(
        redis_server, namespace, iteration=2, total_iterations=4,
        collapsed_drafters={"draft_model": 1.03},
    )  # fmt: skip
    collapsed = cluster.wait_for(
        lambda: (c := drafter_condition()) is not None and c["status"] == "True" and c,
        "DrafterCollapsed=True",
    )
    assert collapsed["reason"] == "DrafterCollapsed"
    assert "draft_model (mean accepted length 1.03)" in collapsed["message"]
    assert "refresh: {every: 1}" in collapsed["message"]
    cluster.wait_for(
        lambda: "DrafterCollapsed" in cluster.event_reasons(namespace), "a Warning event"
    )
    (warning,) = [e for e in cluster.events(namespace) if e["reason"] == "DrafterCollapsed"]
    assert warning["type"] == "Warning"
    assert cluster.status(JOB, namespace)["phase"] == "Running"  # the job keeps training

    write_progress(redis_server, namespace, iteration=3, total_iterations=4)
    recovered = cluster.wait_for(
        lambda: (c := drafter_condition()) is not None and c["status"] == "False" and c,
        "DrafterCollapsed=False",
    )
    assert recovered["reason"] == "DraftersAccepting"
    cluster.wait_for(
        lambda: "DraftersAccepting" in cluster.event_reasons(namespace), "a Normal event"
    )


def test_a_coordinator_reporting_failure_fails_the_job(
    cluster: Cluster, namespace: str, redis_server: redis.Redis
) -> None:
    external_job(cluster, namespace, redis_server)
    write_progress(
        redis_server,
        namespace,
        iteration=1,
        total_iterations=4,
        state="failed",
        message="reward is NaN at iteration 1",
    )
    status = cluster.wait_for_phase(JOB, namespace, "Failed")
    assert status["reason"] == "CoordinatorFailed"
    assert status["message"] == "reward is NaN at iteration 1"


def test_delete_removes_children_and_the_jobs_external_redis_keys(
    cluster: Cluster, namespace: str, redis_server: redis.Redis
) -> None:
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "user-claim", "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    )
    external_job(cluster, namespace, redis_server, storage={"claimName": "user-claim"})
    write_progress(redis_server, namespace, iteration=1, total_iterations=4)
    keys = Keys(namespace, JOB)
    redis_server.xadd(keys.metrics_stream, {"iteration": 1})
    other = Keys(namespace, "another-job").progress
    redis_server.set(other, b"kept")
    cluster.wait_for(lambda: cluster.status(JOB, namespace).get("progress") == "1/4", "progress")

    cluster.kubectl("delete", "rlhfjob", JOB, "-n", namespace, "--timeout=60s")

    def gone() -> bool:
        return (
            all(not cluster.names(kind, namespace) for kind in ("pods", "configmaps", "services"))
            and cluster.names("rlhfjobs", namespace) == []
        )

    cluster.wait_for(gone, "every owned child deleted")
    assert redis_server.exists(keys.progress, keys.metrics_stream) == 0
    assert redis_server.get(other) == b"kept"
    # What the user brought is not the job's to delete.
    assert cluster.names("persistentvolumeclaims", namespace) == ["user-claim"]
    assert cluster.names("secrets", namespace) == ["redis-auth"]
    cleaned = [e for e in cluster.events(namespace) if e["reason"] == "CleanedUp"]
    assert cleaned and "deleted 2 keys" in cleaned[0]["message"]
