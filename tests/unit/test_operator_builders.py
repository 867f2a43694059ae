"""Pure builders: every child, RBAC and install manifest is valid Kubernetes and says the contract.

Every manifest goes through ``kubernetes_validate`` (1.32, strict: unknown fields fail), so a
typo in a builder fails here, not on a cluster. The rest pins what the workers, the Helm chart
and the NetworkPolicy rely on: names, labels, owner references, env, mounts, resources.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rlhfspec_api.manifest import RLHFJob, parse_rlhfjob
from rlhfspec_operator import builders, install, managed_redis, rbac, updates
from rlhfspec_operator.naming import (
    LABEL_JOB,
    LABEL_ROLE,
    OPERATOR_LABELS,
    Owner,
    desired_pods,
    pod_name,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
OWNER_UID = "0b6c5f9e-7d1e-4d0a-9c55-2f1e3c4b5a69"


def make_job(namespace: str = "team-a", **spec_changes: Any) -> RLHFJob:
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"]["namespace"] = namespace
    for path, value in spec_changes.items():
        node = doc["spec"]
        *parents, last = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return parse_rlhfjob(doc)


def owner_of(job: RLHFJob) -> Owner:
    return Owner(job.name, job.namespace, OWNER_UID)


def everything(job: RLHFJob) -> list[dict[str, Any]]:
    owner = owner_of(job)
    return builders.children(
        job, owner, password="s3cret", operator_namespace="rlhfspec-system"
    ) + builders.worker_pods(job, owner)


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, "1.32.0", strict=True)


JOBS = {
    "managed": make_job(),
    "external": make_job(
        coordinator={
            "mode": "external",
            "url": "redis://redis.infra:6379/0",
            "passwordSecret": {"name": "redis-auth"},
        },
    ),
    "claim-gpu": make_job(
        storage={"claimName": "shared-checkpoints"},
        generation__replicas=3,
        generation__resources={"cpu": 8, "memory": "64Gi", "gpu": 2},
    ),
}


@pytest.mark.parametrize("case", sorted(JOBS))
def test_every_child_is_valid_kubernetes(case: str) -> None:
    for obj in everything(JOBS[case]):
        validate(obj)


@pytest.mark.parametrize("watch", [None, ["team-a", "team-b"]])
@pytest.mark.parametrize("peering", [None, "rlhfspec"])
def test_operator_install_and_rbac_are_valid_kubernetes(
    watch: list[str] | None, peering: str | None
) -> None:
    objects = install.operator_manifests(watch, peering=peering)
    for obj in objects:
        validate(obj)
    kinds = [o["kind"] for o in objects]
    if watch is None:
        assert kinds == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"]
    else:
        assert kinds == [
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
        ]
        assert [o["metadata"]["namespace"] for o in objects[1:5]] == ["team-a"] * 2 + ["team-b"] * 2


def test_every_child_is_owned_labelled_and_deterministically_named() -> None:
    job = JOBS["managed"]
    objects = everything(job)
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names))
    assert names == [(o["kind"], o["metadata"]["name"]) for o in everything(job)]
    for obj in objects:
        meta = obj["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["name"].startswith("tiny-grpo-")
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "rlhfspec.io/v1alpha1",
                "kind": "RLHFJob",
                "name": "tiny-grpo",
                "uid": OWNER_UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = meta["labels"]
        assert labels[LABEL_JOB] == "tiny-grpo"
        assert labels["app.kubernetes.io/instance"] == "tiny-grpo"
        assert labels["app.kubernetes.io/managed-by"] == "rlhfspec-operator"
        assert labels[LABEL_ROLE] == labels["app.kubernetes.io/component"]
    assert sorted(n for k, n in names if k == "Pod") == sorted(desired_pods("tiny-grpo", 1))


def test_config_map_holds_the_parsed_defaulted_manifest() -> None:
    job = JOBS["managed"]
    config = builders.config_map(job, owner_of(job))
    stored = yaml.safe_load(config["data"]["job.yaml"])
    assert stored == job.to_manifest()
    assert parse_rlhfjob(stored).spec == job.spec
    assert stored["spec"]["generation"]["speculative"]["selector"]["hysteresis"] == 0.04


def _pods(job: RLHFJob) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in builders.worker_pods(job, owner_of(job))}


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_worker_pods_run_the_role_with_the_env_contract() -> None:
    job = JOBS["claim-gpu"]
    pods = _pods(job)
    assert sorted(pods) == sorted(
        ["tiny-grpo-coordinator", "tiny-grpo-inference", "tiny-grpo-trainer"]
        + [f"tiny-grpo-generation-{i}" for i in range(3)]
    )
    generation = pods["tiny-grpo-generation-2"]
    container = generation["spec"]["containers"][0]
    assert container["command"] == ["rlhfspec", "worker", "generation"]
    assert container["image"] == job.spec.image
    assert container["ports"] == [
        {"name": "metrics", "containerPort": 9400},
        {"name": "kv", "containerPort": 9401},
    ]
    env = _env(generation)
    assert env["RLHFSPEC_JOB"] == "tiny-grpo"
    assert env["RLHFSPEC_NAMESPACE"] == "team-a"
    assert env["RLHFSPEC_ROLE"] == "generation"
    assert env["RLHFSPEC_WORKER_INDEX"] == "2"
    assert env["RLHFSPEC_REPLICAS"] == "3"
    assert env["RLHFSPEC_REDIS_URL"] == "redis://tiny-grpo-redis.team-a.svc:6379/0"
    assert env["RLHFSPEC_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "tiny-grpo-redis", "key": "password"}
    }
    assert env["RLHFSPEC_JOB_CONFIG"] == "/etc/rlhfspec/job.yaml"
    assert env["RLHFSPEC_STORAGE"] == "/data"
    assert env["RLHFSPEC_METRICS_PORT"] == "9400"
    # Peers pull KV snapshots from the pod's stable DNS name (hostname.subdomain).
    assert env["RLHFSPEC_KV_PORT"] == "9401"
    assert env["RLHFSPEC_KV_HOST"] == "tiny-grpo-generation-2.tiny-grpo-generation.team-a.svc"
    assert "RLHFSPEC_KV_PORT" not in _env(pods["tiny-grpo-trainer"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {
        "/etc/rlhfspec": "config",
        "/data": "storage",
        "/tmp": "tmp",
        "/dev/shm": "dshm",
    }
    volumes = {v["name"]: v for v in generation["spec"]["volumes"]}
    assert volumes["storage"]["persistentVolumeClaim"] == {"claimName": "shared-checkpoints"}
    assert volumes["config"]["configMap"]["name"] == "tiny-grpo-config"
    assert generation["spec"]["restartPolicy"] == "Never"
    assert generation["spec"]["subdomain"] == "tiny-grpo-generation"
    assert _env(pods["tiny-grpo-trainer"])["RLHFSPEC_WORKER_INDEX"] == "0"
    assert pods["tiny-grpo-coordinator"]["spec"]["containers"][0]["command"][-1] == "coordinator"


@pytest.mark.parametrize("case", ["managed", "external"])
def test_generation_pods_get_the_jobs_kv_key_from_a_secret_the_job_owns(case: str) -> None:
    """Peers authorise KV snapshot pulls with it: a Secret of its own (external mode has no
    Redis Secret), owned by the job, referenced only by generation pods, its value nowhere
    else."""
    job, owner = JOBS[case], owner_of(JOBS[case])
    key = "ab" * 32
    objects = builders.children(job, owner, password="s3cret", operator_namespace=None, kv_key=key)
    secret = objects[1]  # right after the config, before any pod can reference it
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", "tiny-grpo-kv")
    assert secret["metadata"]["ownerReferences"] == [owner.reference()]
    assert secret["metadata"]["ownerReferences"][0]["controller"] is True
    assert managed_redis.decode_secret_value(secret, "key") == key
    validate(secret)
    pods = builders.worker_pods(job, owner)
    for pod in pods:
        env = _env(pod)
        if pod["metadata"]["labels"][LABEL_ROLE] == "generation":
            assert env["RLHFSPEC_KV_SECRET"] == {
                "secretKeyRef": {"name": "tiny-grpo-kv", "key": "key"}
            }
        else:
            assert "RLHFSPEC_KV_SECRET" not in env
    assert key not in yaml.safe_dump(pods + [o for o in objects if o is not secret])
    drawn = [
        managed_redis.decode_secret_value(
            builders.children(job, owner, password="s3cret", operator_namespace=None)[1], "key"
        )
        for _ in range(2)
    ]
    assert drawn[0] != drawn[1]
    assert all(value is not None and len(bytes.fromhex(value)) == 32 for value in drawn)


def test_gpu_requests_come_from_the_spec_and_cpu_pods_request_none() -> None:
    pods = _pods(JOBS["claim-gpu"])
    generation = pods["tiny-grpo-generation-0"]
    resources = generation["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}
    assert resources["limits"] == resources["requests"]
    assert generation["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    trainer = pods["tiny-grpo-trainer"]["spec"]
    assert "nvidia.com/gpu" not in trainer["containers"][0]["resources"]["requests"]
    assert "tolerations" not in trainer


def test_pods_run_as_non_root_with_a_read_only_root_filesystem() -> None:
    job = JOBS["managed"]
    redis = next(o for o in everything(job) if o["kind"] == "Deployment")
    pod_specs = [p["spec"] for p in _pods(job).values()] + [redis["spec"]["template"]["spec"]]
    for spec in pod_specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}


def test_managed_redis_password_lives_only_in_the_secret() -> None:
    job = JOBS["managed"]
    objects = {(o["kind"], o["metadata"]["name"]): o for o in everything(job)}
    secret = objects[("Secret", "tiny-grpo-redis")]
    assert managed_redis.decode_secret_value(secret, "password") == "s3cret"
    config = base64.b64decode(secret["data"]["redis.conf"]).decode()
    assert "requirepass s3cret" in config
    deployment = objects[("Deployment", "tiny-grpo-redis")]
    rendered = yaml.safe_dump([o for o in objects.values() if o["kind"] != "Secret"])
    assert "s3cret" not in rendered
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["redis-server", "/etc/redis/redis.conf"]
    assert objects[("Service", "tiny-grpo-redis")]["spec"]["selector"] == {
        LABEL_JOB: "tiny-grpo",
        LABEL_ROLE: "redis",
    }


def test_network_policy_admits_only_the_jobs_pods_and_the_operator() -> None:
    job = JOBS["managed"]
    policy = next(o for o in everything(job) if o["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        LABEL_JOB: "tiny-grpo",
        LABEL_ROLE: "redis",
    }
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {LABEL_JOB: "tiny-grpo"}}},
        {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": "rlhfspec-system"}
            },
            "podSelector": {"matchLabels": OPERATOR_LABELS},
        },
    ]
    deployment = install.operator_deployment(None)
    assert deployment["spec"]["template"]["metadata"]["labels"].items() >= OPERATOR_LABELS.items()
    alone = managed_redis.network_policy(job, owner_of(job), None)
    assert len(alone["spec"]["ingress"][0]["from"]) == 1


def test_external_mode_creates_no_redis_and_uses_the_users_secret() -> None:
    job = JOBS["external"]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in everything(job)}
    assert not any("redis" in name for _, name in kinds)
    env = _env(_pods(job)["tiny-grpo-trainer"])
    assert env["RLHFSPEC_REDIS_URL"] == "redis://redis.infra:6379/0"
    assert env["RLHFSPEC_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "redis-auth", "key": "password"}
    }
    no_password = make_job(coordinator={"mode": "external", "url": "redis://r:6379/0"})
    assert "RLHFSPEC_REDIS_PASSWORD" not in _env(_pods(no_password)["tiny-grpo-trainer"])


def test_storage_claim_is_created_only_for_a_size() -> None:
    claim = builders.storage_claim(JOBS["managed"], owner_of(JOBS["managed"]))
    assert claim is not None
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert builders.storage_claim(JOBS["claim-gpu"], owner_of(JOBS["claim-gpu"])) is None
    classed = make_job(storage={"size": "5Gi", "storageClassName": "fast"})
    built = builders.storage_claim(classed, owner_of(classed))
    assert built is not None and built["spec"]["storageClassName"] == "fast"


def test_a_local_storage_path_is_a_cluster_error_naming_the_field() -> None:
    job = make_job(storage={"path": "/tmp/run"})
    (error,) = builders.cluster_errors(job)
    assert str(error).startswith("spec.storage.path: ")
    assert builders.cluster_errors(JOBS["managed"]) == []


def test_names_of_the_longest_job_stay_valid_dns_labels() -> None:
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"]["name"] = "j" * 40
    doc["metadata"]["namespace"] = "ns"
    job = parse_rlhfjob(doc)
    for obj in everything(job):
        assert len(obj["metadata"]["name"]) <= 63
        validate(obj)
    assert pod_name("j", "generation", 7) == "j-generation-7"


def test_rbac_lists_exactly_the_verbs_the_operator_uses() -> None:
    (cluster_role, binding) = rbac.rbac_manifests(None)
    granted = {
        (group, resource, verb)
        for rule in cluster_role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert ("", "pods", "create") in granted
    assert not any(verb in ("*", "update", "deletecollection") for _, _, verb in granted)
    assert not any(resource == "*" for _, resource, _ in granted)
    assert ("", "secrets", "list") not in granted  # reading one Secret by name suffices
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rlhfspec-operator", "namespace": "rlhfspec-system"}
    ]
    peered = rbac.rbac_manifests(["a"], peering=True)[0]["rules"]
    assert rbac.allows(peered, "kopf.dev", "kopfpeerings", "patch")
    assert not rbac.allows(cluster_role["rules"], "kopf.dev", "kopfpeerings", "patch")


def test_operator_deployment_runs_the_entrypoint_with_a_liveness_probe() -> None:
    deployment = install.operator_deployment(["team-a"], peering=None)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["rlhfspec"]
    assert container["args"] == [
        "operator",
        "--namespace",
        "team-a",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--standalone",
    ]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert install.operator_args(None, "rlhfspec")[1:] == [
        "--all-namespaces",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--peering=rlhfspec",
    ]


def test_only_the_mutable_fields_of_a_running_job_are_accepted() -> None:
    job = JOBS["managed"]
    old = job.spec.to_wire()
    new = copy.deepcopy(old)
    new["generation"]["replicas"] = 3
    new["suspend"] = True
    new["image"] = "evil:latest"
    new["algorithm"]["learningRate"] = 1e-3
    changed = updates.changed_fields(old, new)
    accepted, rejected = updates.split_changes(changed)
    assert accepted == ["generation.replicas", "suspend"]
    assert rejected == ["algorithm.learningRate", "image"]
    live = parse_rlhfjob({**job.to_manifest(), "spec": new}).spec
    pinned = updates.pinned_spec({updates.APPLIED_SPEC_ANNOTATION: updates.pin(job.spec)})
    effective = updates.effective_spec(live, pinned)
    assert effective.generation.replicas == 3
    assert effective.suspend is True
    assert effective.image == job.spec.image
    assert effective.algorithm.learning_rate == job.spec.algorithm.learning_rate
    assert updates.effective_spec(live, None) == live
    assert updates.pinned_spec({updates.APPLIED_SPEC_ANNOTATION: "{not json"}) is None
