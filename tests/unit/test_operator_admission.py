"""What a valid RLHFJob may still not ask of a cluster (issue #17, findings 2, 5, 8, 9).

The operator acts with its own service account: a job must not make it run images the
administrator did not allow, connect to a Redis host outside the allow-list, send a Secret its
owner did not label for that, read models from the pod's filesystem or outside the job's
storage, or leave its worker pods' ports open to anyone. Each refusal names the field.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rlhfspec_api.manifest import RLHFJob, parse_rlhfjob
from rlhfspec_api.models import Resources
from rlhfspec_operator import admission, network_policy
from rlhfspec_operator.config import CONFIG, parse_peers
from rlhfspec_operator.main import build_parser
from rlhfspec_operator.naming import Owner

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
OWNER = Owner("tiny-grpo", "team-a", "0b6c5f9e-7d1e-4d0a-9c55-2f1e3c4b5a69")
EXTERNAL = {
    "mode": "external",
    "url": "redis://redis.infra.svc:6379/0",
    "passwordSecret": {"name": "redis-auth"},
}
PROMETHEUS = [
    {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
]


def make_job(**spec: Any) -> RLHFJob:
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"]["namespace"] = "team-a"
    doc["spec"].update(spec)
    return parse_rlhfjob(doc)


def lines(errors: list[Any]) -> list[str]:
    return [str(e) for e in errors]


# --- finding 5: locations on a cluster ----------------------------------------------------


def test_a_cluster_job_may_not_read_the_pods_filesystem_or_leave_its_storage() -> None:
    job = make_job(
        models={"policy": {"path": "file:///etc/rlhfspec"}},
        dataset={**EXAMPLE["spec"]["dataset"], "path": "pvc://../../../etc/passwd"},
    )
    assert lines(admission.spec_errors(job)) == [
        "spec.models.policy.path: 'file:///etc/rlhfspec' is a path on the pod's own filesystem, "
        "which a cluster job may not read models or data from (on a cluster: pvc://<path under "
        "the job's storage>, tiny:// or zoo://)",
        "spec.dataset.path: 'pvc://../../../etc/passwd' leaves the job's storage (pvc://<relative "
        "path under the job's storage>, without '..' or a leading '/')",
    ]
    assert admission.spec_errors(make_job()) == []


# --- finding 9: allowed images --------------------------------------------------------------


def test_images_outside_allowed_images_are_refused_naming_the_field() -> None:
    job = make_job(image="evil.example/miner:1")
    refused = lines(
        admission.policy_errors(job, allowed_images=["ghcr.io/rlhfspec/*"], allowed_redis_hosts=[])
    )
    assert refused == [
        "spec.image: image 'evil.example/miner:1' is not allowed on this cluster (images "
        "matching ghcr.io/rlhfspec/*; set by the cluster's administrator in the chart's "
        "allowedImages)",
        "spec.coordinator.redisImage: image 'redis:7.4-alpine' is not allowed on this cluster "
        "(images matching ghcr.io/rlhfspec/*; set by the cluster's administrator in the chart's "
        "allowedImages)",
    ]
    allowed = ["ghcr.io/rlhfspec/*", "redis:7.4-*"]
    assert admission.policy_errors(make_job(), allowed_images=allowed, allowed_redis_hosts=[]) == []
    # No list: any image (the chart's README says what that grants).
    assert admission.policy_errors(job, allowed_images=[], allowed_redis_hosts=[]) == []


# --- finding 2: external Redis host and the password Secret's opt-in label -------------------


def test_an_external_redis_host_must_be_on_the_allow_list() -> None:
    job = make_job(coordinator={**EXTERNAL, "url": "rediss://attacker.example:6380/0"})
    [line] = lines(admission.policy_errors(job, allowed_images=[], allowed_redis_hosts=[]))
    assert line.startswith(
        "spec.coordinator.url: host 'attacker.example' is not a Redis host the operator may "
        "connect to (hosts matching none;"
    )
    hosts = ["*.infra.svc", "redis.shared.example"]
    [line] = lines(admission.policy_errors(job, allowed_images=[], allowed_redis_hosts=hosts))
    assert "hosts matching *.infra.svc, redis.shared.example" in line
    ok = make_job(coordinator=EXTERNAL)
    assert admission.policy_errors(ok, allowed_images=[], allowed_redis_hosts=hosts) == []
    # Managed mode's Redis is the job's own: no host to allow.
    assert admission.policy_errors(make_job(), allowed_images=[], allowed_redis_hosts=[]) == []


def _secret(labels: dict[str, str] | None, data: dict[str, str] | None) -> dict[str, Any]:
    return {"metadata": {"name": "redis-auth", "labels": labels or {}}, "data": data or {}}


def test_the_password_secret_must_be_labelled_by_its_owner_and_hold_the_key() -> None:
    job = make_job(coordinator=EXTERNAL)
    label = {admission.SECRET_OPT_IN_LABEL: "true"}
    assert lines(admission.password_secret_errors(job, None)) == [
        "spec.coordinator.passwordSecret.name: Secret 'redis-auth' not found (an existing Secret)"
    ]
    [unlabelled] = lines(admission.password_secret_errors(job, _secret(None, {"password": "eA=="})))
    assert unlabelled.startswith(
        "spec.coordinator.passwordSecret.name: Secret 'redis-auth' does not carry the label "
        "rlhfspec.io/coordinator-password=true"
    )
    wrong_value = {admission.SECRET_OPT_IN_LABEL: "yes"}
    assert admission.password_secret_errors(job, _secret(wrong_value, {"password": "eA=="}))
    [no_key] = lines(admission.password_secret_errors(job, _secret(label, {"token": "eA=="})))
    assert no_key.startswith("spec.coordinator.passwordSecret.key: Secret 'redis-auth' has no key")
    assert admission.password_secret_errors(job, _secret(label, {"password": "eA=="})) == []
    # Managed jobs name no Secret of the user's.
    assert admission.password_secret_errors(make_job(), None) == []


# --- finding 8: the job's worker NetworkPolicy ----------------------------------------------


def test_worker_network_policy_admits_only_generation_pods_to_kv_and_prometheus_to_metrics() -> (
    None
):
    job = make_job()
    policy = network_policy.worker_network_policy(job, OWNER, PROMETHEUS)
    kubernetes_validate.validate(policy, "1.32.0", strict=True)
    assert policy["metadata"]["name"] == "tiny-grpo-workers"
    assert policy["metadata"]["ownerReferences"] == [OWNER.reference()]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    selected = policy["spec"]["podSelector"]
    assert selected["matchLabels"] == {"rlhfspec.io/job": "tiny-grpo"}
    assert selected["matchExpressions"] == [
        {
            "key": "rlhfspec.io/role",
            "operator": "In",
            "values": ["coordinator", "generation", "inference", "trainer"],
        }
    ]
    kv, metrics = policy["spec"]["ingress"]
    assert kv == {
        "from": [
            {"podSelector": {"matchLabels": {"rlhfspec.io/job": "tiny-grpo",
                                             "rlhfspec.io/role": "generation"}}}
        ],
        "ports": [{"protocol": "TCP", "port": 9401}],
    }  # fmt: skip
    assert metrics == {"from": PROMETHEUS, "ports": [{"protocol": "TCP", "port": 9400}]}
    # Without peers the metrics port is open to no one: no rule admits it.
    closed = network_policy.worker_network_policy(job, OWNER, [])
    assert [r["ports"][0]["port"] for r in closed["spec"]["ingress"]] == [9401]
    kubernetes_validate.validate(closed, "1.32.0", strict=True)


# --- the flags and environment the chart sets -----------------------------------------------


def test_policy_flags_reach_the_operator_config(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        [
            "-A",
            "--allowed-image=ghcr.io/rlhfspec/*",
            "--allowed-image=redis:7.4-alpine",
            "--allowed-redis-host=*.infra.svc",
            "--metrics-from=" + json.dumps(PROMETHEUS),
        ]
    )
    assert args.allowed_images == ["ghcr.io/rlhfspec/*", "redis:7.4-alpine"]
    assert args.allowed_redis_hosts == ["*.infra.svc"]
    assert args.metrics_from == PROMETHEUS
    with pytest.raises(ValueError, match="JSON list of NetworkPolicy peer"):
        parse_peers('{"podSelector": {}}')
    monkeypatch.setenv("RLHFSPEC_OPERATOR_ALLOWED_IMAGES", "a/*, b/*")
    monkeypatch.setenv("RLHFSPEC_OPERATOR_ALLOWED_REDIS_HOSTS", "redis.infra.svc")
    monkeypatch.setenv("RLHFSPEC_OPERATOR_METRICS_FROM", '[{"podSelector": {}}]')
    fresh = type(CONFIG)()
    assert fresh.allowed_images == ["a/*", "b/*"]
    assert fresh.allowed_redis_hosts == ["redis.infra.svc"]
    assert fresh.metrics_from == [{"podSelector": {}}]


# --- worker pods: bounded /dev/shm, the password's source, a rediss:// CA (findings 6, 8, 2) --


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]
    }


def test_worker_pods_bound_dev_shm_and_report_their_last_words() -> None:
    from rlhfspec_operator import builders

    job = make_job(generation={**EXAMPLE["spec"].get("generation", {}),
                               "resources": {"cpu": 2, "memory": "16Gi"}})  # fmt: skip
    for pod in builders.worker_pods(job, OWNER):
        kubernetes_validate.validate(pod, "1.32.0", strict=True)
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        memory = builders.role_resources(job, pod["metadata"]["labels"]["rlhfspec.io/role"]).memory
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["dshm"]["emptyDir"]["sizeLimit"] == builders.shm_size_limit(
            Resources(memory=memory)
        )
        container = pod["spec"]["containers"][0]
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert builders.shm_size_limit(Resources(memory="16Gi")) == "8192Mi"
    assert builders.shm_size_limit(Resources(memory="64Mi")) == "64Mi"  # a floor


def test_workers_are_told_which_secret_and_key_their_password_comes_from() -> None:
    from rlhfspec_operator import builders

    managed = builders.worker_pod(make_job(), OWNER, "trainer")
    assert _env(managed)["RLHFSPEC_REDIS_PASSWORD_SOURCE"] == (
        "Secret team-a/tiny-grpo-redis, key password"
    )
    external = builders.worker_pod(make_job(coordinator=EXTERNAL), OWNER, "trainer")
    assert _env(external)["RLHFSPEC_REDIS_PASSWORD_SOURCE"] == (
        "Secret team-a/redis-auth, key password"
    )
    bare = {k: v for k, v in EXTERNAL.items() if k != "passwordSecret"}
    none = builders.worker_pod(make_job(coordinator=bare), OWNER, "trainer")
    assert "RLHFSPEC_REDIS_PASSWORD" not in _env(none)
    assert _env(none)["RLHFSPEC_REDIS_PASSWORD_SOURCE"].startswith("no password")


def test_a_rediss_coordinator_ca_is_mounted_for_every_worker() -> None:
    from rlhfspec_api.manifest import ManifestError
    from rlhfspec_operator import builders

    tls = {**EXTERNAL, "url": "rediss://redis.infra.svc:6380/0",
           "caConfigMap": {"name": "redis-ca"}}  # fmt: skip
    job = make_job(coordinator=tls)
    for pod in builders.worker_pods(job, OWNER):
        kubernetes_validate.validate(pod, "1.32.0", strict=True)
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["redis-ca"] == {"name": "redis-ca", "configMap": {"name": "redis-ca"}}
        mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/etc/rlhfspec-redis-ca"]["readOnly"] is True
        assert _env(pod)["RLHFSPEC_REDIS_CA_FILE"] == "/etc/rlhfspec-redis-ca/ca.crt"
    plain = builders.worker_pod(make_job(coordinator=EXTERNAL), OWNER, "trainer")
    assert "RLHFSPEC_REDIS_CA_FILE" not in _env(plain)
    with pytest.raises(ManifestError) as caught:
        make_job(coordinator={**EXTERNAL, "caConfigMap": {"name": "redis-ca"}})
    assert [str(e) for e in caught.value.errors] == [
        "spec.coordinator.caConfigMap: a CA verifies a TLS server, and the coordinator URL is "
        "not rediss:// (external mode with a rediss:// url, or remove caConfigMap)"
    ]
