"""The operator's admission and ownership rules, as a user meets them (issue #17, findings 2,
3, 6, 9): through kubectl against the emulator, with the session operator's policy
(``cluster.POLICY_FLAGS``: the example's images, 127.0.0.1 as the one external Redis host).
Every refusal leaves a Failed job whose condition names the field or the object.
"""

from __future__ import annotations

import base64
from typing import Any

import redis
from cluster import REDIS_PASSWORD, Cluster, example_job

JOB = "tiny-grpo"
LABEL = "rlhfspec.io/coordinator-password"


def failed_condition(cluster: Cluster, namespace: str, reason: str) -> dict[str, Any]:
    status = cluster.wait_for_phase(JOB, namespace, "Failed")
    assert status["reason"] == reason, status
    condition = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert condition["reason"] == reason
    return dict(condition)


def password_secret(namespace: str, password: str, labelled: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "redis-auth", "namespace": namespace}
    if labelled:
        meta["labels"] = {LABEL: "true"}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": {"password": base64.b64encode(password.encode()).decode()},
    }


def external(server: redis.Redis, host: str = "127.0.0.1") -> dict[str, Any]:
    port = server.connection_pool.connection_kwargs["port"]
    return {
        "mode": "external",
        "url": f"redis://{host}:{port}/0",
        "passwordSecret": {"name": "redis-auth"},
    }


# --- finding 3: nothing is adopted ----------------------------------------------------------


def test_a_foreign_service_under_a_childs_name_fails_the_job_naming_it(
    cluster: Cluster, namespace: str
) -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{JOB}-redis", "namespace": namespace},
        "spec": {"ports": [{"port": 6379}], "selector": {"app": "someone-elses-redis"}},
    }
    cluster.apply(foreign)
    cluster.apply(example_job(JOB, namespace))
    condition = failed_condition(cluster, namespace, "ChildConflict")
    assert condition["message"].startswith(
        f"Service {namespace}/{JOB}-redis already exists and is not owned by this RLHFJob"
    )
    service = cluster.get("service", f"{JOB}-redis", namespace)
    assert service is not None and not service["metadata"].get("ownerReferences")
    assert cluster.pod_names(namespace, JOB) == []
    assert "ChildConflict" in cluster.event_reasons(namespace)


def test_a_planted_redis_secret_is_neither_read_nor_adopted(
    cluster: Cluster, namespace: str
) -> None:
    planted = password_secret(namespace, "attacker-knows-this", labelled=False)
    planted["metadata"]["name"] = f"{JOB}-redis"
    cluster.apply(planted)
    cluster.apply(example_job(JOB, namespace))
    condition = failed_condition(cluster, namespace, "ChildConflict")
    assert f"Secret {namespace}/{JOB}-redis already exists" in condition["message"]
    assert cluster.names("deployments", namespace) == []  # no Redis runs with that password
    assert cluster.pod_names(namespace, JOB) == []


def test_a_foreign_pod_under_a_workers_name_fails_the_job_and_frees_the_others(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{JOB}-trainer", "namespace": namespace},
            "spec": {"containers": [{"name": "x", "image": "busybox"}]},
        }
    )
    cluster.apply(example_job(JOB, namespace))
    condition = failed_condition(cluster, namespace, "ChildConflict")
    assert f"Pod {namespace}/{JOB}-trainer already exists" in condition["message"]
    cluster.wait_for(
        lambda: cluster.names("pods", namespace) == [f"{JOB}-trainer"],
        "the job's own pods deleted, the foreign one untouched",
    )


# --- findings 2 and 9: the cluster's admission policy ---------------------------------------


def test_an_image_outside_allowed_images_is_refused_naming_the_field(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(example_job(JOB, namespace, image="evil.example/miner:1"))
    condition = failed_condition(cluster, namespace, "NotAllowed")
    assert condition["message"].startswith(
        "spec.image: image 'evil.example/miner:1' is not allowed on this cluster"
    )
    assert cluster.names("configmaps", namespace) == []  # nothing created


def test_a_redis_host_off_the_allow_list_is_refused_naming_the_field(
    cluster: Cluster, namespace: str, redis_server: redis.Redis
) -> None:
    cluster.apply(password_secret(namespace, REDIS_PASSWORD, labelled=True))
    cluster.apply(example_job(JOB, namespace, coordinator=external(redis_server, "10.9.9.9")))
    condition = failed_condition(cluster, namespace, "NotAllowed")
    assert condition["message"].startswith(
        "spec.coordinator.url: host '10.9.9.9' is not a Redis host the operator may connect to"
    )
    assert cluster.pod_names(namespace, JOB) == []


def test_an_unlabelled_password_secret_is_never_used(
    cluster: Cluster, namespace: str, redis_server: redis.Redis
) -> None:
    cluster.apply(password_secret(namespace, REDIS_PASSWORD, labelled=False))
    cluster.apply(example_job(JOB, namespace, coordinator=external(redis_server)))
    condition = failed_condition(cluster, namespace, "NotAllowed")
    assert condition["message"].startswith(
        f"spec.coordinator.passwordSecret.name: Secret 'redis-auth' does not carry the label "
        f"{LABEL}=true"
    )
    assert cluster.pod_names(namespace, JOB) == []  # no pod gets it either


# --- finding 6: a wrong password is named, not an outage -----------------------------------


def test_a_wrong_password_is_authentication_failed_naming_the_secret(
    cluster: Cluster, namespace: str, redis_server: redis.Redis
) -> None:
    cluster.apply(password_secret(namespace, "not-the-password", labelled=True))
    cluster.apply(example_job(JOB, namespace, coordinator=external(redis_server)))

    def refused() -> dict[str, Any] | None:
        conditions = {c["type"]: c for c in cluster.status(JOB, namespace).get("conditions", [])}
        reachable = conditions.get("CoordinatorReachable")
        return reachable if reachable and reachable["status"] == "False" else None

    reachable = cluster.wait_for(refused, "CoordinatorReachable False")
    assert reachable["reason"] == "AuthenticationFailed"
    assert reachable["message"].startswith(
        f"Redis refused the password from Secret {namespace}/redis-auth, key password"
    )
