"""Deleting jobs and restarting the operator under a live job (issue #18's operator faults).

A managed job's children go with it; a job deleted while the operator is down keeps its
finalizer until the operator is back and then goes; an external Redis that cannot be reached
does not block deletion (a CleanupFailed warning says what was left); an operator killed and
restarted under a running job takes it over without creating anything twice.
"""

from __future__ import annotations

from cluster import (
    POLICY_FLAGS,
    UNREACHABLE_REDIS,
    Cluster,
    example_job,
    external_coordinator,
    redis_password_secret,
)

JOB = "tiny-grpo"


def _running_job(cluster: Cluster, namespace: str, **spec: object) -> None:
    cluster.apply(example_job(JOB, namespace, **spec))
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, JOB)) == 4, "4 worker pods")
    for pod in cluster.pod_names(namespace, JOB):
        cluster.set_pod_status(namespace, pod, "Running")
    cluster.wait_for_phase(JOB, namespace, "Running")


def _children_gone(cluster: Cluster, namespace: str) -> bool:
    kinds = ("pods", "configmaps", "services", "deployments", "rlhfjobs")
    return all(not cluster.names(kind, namespace) for kind in kinds)


def test_deleting_a_managed_job_removes_it_and_its_children(
    cluster: Cluster, namespace: str
) -> None:
    _running_job(cluster, namespace)
    assert cluster.names("deployments", namespace)  # the managed Redis
    cluster.kubectl("delete", "rlhfjob", JOB, "-n", namespace, "--timeout=60s")
    cluster.wait_for(lambda: _children_gone(cluster, namespace), "the job and its children gone")


def test_a_job_deleted_while_the_operator_is_down_goes_when_it_returns(
    own_cluster: Cluster,
) -> None:
    cluster, namespace = own_cluster, "deleted-while-down"
    flags = ("--namespace", namespace, *POLICY_FLAGS)
    cluster.start_operator(*flags, coordinator_url=UNREACHABLE_REDIS)
    _running_job(cluster, namespace)
    cluster.stop_operator(kill=True)

    cluster.kubectl("delete", "rlhfjob", JOB, "-n", namespace, "--wait=false")
    # The finalizer holds it: nothing may vanish without the operator's cleanup.
    job = cluster.get("rlhfjob", JOB, namespace)
    assert job is not None and job["metadata"].get("deletionTimestamp")
    assert cluster.names("pods", namespace)

    cluster.start_operator(*flags, coordinator_url=UNREACHABLE_REDIS)
    cluster.wait_for(lambda: _children_gone(cluster, namespace), "the job and its children gone")


def test_an_unreachable_external_redis_does_not_block_deletion(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(redis_password_secret(namespace))
    coordinator = external_coordinator(UNREACHABLE_REDIS)
    cluster.apply(example_job(JOB, namespace, coordinator=coordinator))
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, JOB)) == 4, "4 worker pods")

    cluster.kubectl("delete", "rlhfjob", JOB, "-n", namespace, "--timeout=90s")
    cluster.wait_for(lambda: _children_gone(cluster, namespace), "the job and its children gone")
    failed = [e for e in cluster.events(namespace) if e["reason"] == "CleanupFailed"]
    assert failed and "job keys left in Redis" in failed[0]["message"]
    assert cluster.names("secrets", namespace) == ["redis-auth"]  # the user's, kept


def test_operator_restart_under_a_running_job_takes_over_without_duplicates(
    own_cluster: Cluster,
) -> None:
    cluster, namespace = own_cluster, "restart-running"
    flags = ("--namespace", namespace, *POLICY_FLAGS)
    cluster.start_operator(*flags, coordinator_url=UNREACHABLE_REDIS)
    _running_job(cluster, namespace)
    before = cluster.emulator.call(lambda emulator: dict(emulator.creations))
    cluster.stop_operator(kill=True)
    cluster.start_operator(*flags, coordinator_url=UNREACHABLE_REDIS)

    # The new operator is in charge: a worker pod that fails is recreated by it.
    victim = sorted(cluster.pod_names(namespace, JOB))[0]
    cluster.set_pod_status(namespace, victim, "Failed", reason="Evicted")
    cluster.wait_for(
        lambda: any(e["reason"] == "PodFailed" for e in cluster.events(namespace)),
        "the new operator to see the failed pod",
    )
    cluster.wait_for(lambda: len(cluster.pod_names(namespace, JOB)) == 4, "the pod recreated")
    assert cluster.status(JOB, namespace).get("phase") in ("Running", "Initializing")
    after = cluster.emulator.call(lambda emulator: dict(emulator.creations))
    created = {
        key: after[key] - before.get(key, 0)
        for key in after
        if key[1] == namespace and "/events" not in key[0] and after[key] != before.get(key, 0)
    }
    # Only the failed pod was created again; every other child exactly once overall.
    assert all(count == 1 for count in created.values()), created
    assert all("pods" in key[0] for key in created), created
    assert all(
        n == 1
        for k, n in after.items()
        if k[1] == namespace and "pods" not in k[0] and "/events" not in k[0] and k[2] != JOB
    ), after
