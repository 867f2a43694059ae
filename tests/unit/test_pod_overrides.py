"""spec.podTemplateOverrides, Kueue gang metadata and the TTL's bookkeeping, without a cluster.

Every pod the builders render with overrides goes through ``kubernetes_validate`` (1.32,
strict), as in ``test_operator_builders``. The rest pins the merge rules (default under role,
the operator's values kept and never replaced), the Kueue pod-group labels and count, and
that every override touching what the operator owns is refused with the field named.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rlhfspec_api.manifest import ManifestError, RLHFJob, parse_rlhfjob
from rlhfspec_api.scheduling import (
    RESERVED_ENV_NAMES,
    RESERVED_ENV_PREFIX,
    RESERVED_MOUNT_PATHS,
    RESERVED_VOLUME_PREFIX,
    RESERVED_VOLUMES,
)
from rlhfspec_api.status import ConditionStatus, ConditionType, Phase, RLHFJobStatus
from rlhfspec_operator import builders, managed_redis, overrides, queueing, ttl
from rlhfspec_operator.naming import Owner
from rlhfspec_operator.pods import pod_view

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
SCHEDULING_EXAMPLE = ROOT / "examples" / "tiny-grpo-scheduling.yaml"
UID = "6f1c2d3e-0000-4000-8000-000000000001"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
QUEUE = "kueue.x-k8s.io/queue-name"

OVERRIDES: dict[str, Any] = {
    "default": {
        "nodeSelector": {"pool": "rl", "zone": "a"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "rl", "effect": "NoSchedule"}
        ],
        "priorityClassName": "batch-low",
        "imagePullSecrets": [{"name": "regcred"}],
        "env": [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "LOG_FORMAT", "value": "text"},
        ],
        "labels": {"team": "rl"},
        "annotations": {"example.com/owner": "rl-team"},
    },
    "generation": {
        "nodeSelector": {"zone": "b"},
        "priorityClassName": "batch-high",
        "tolerations": [GPU_TOLERATION],
        "env": [{"name": "LOG_FORMAT", "value": "json"}],
        "envFrom": [{"prefix": "S3_", "secretRef": {"name": "s3-creds"}}],
        "volumes": [
            {"name": "models", "persistentVolumeClaim": {"claimName": "model-cache"}},
            {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        ],
        "volumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "scratch", "mountPath": "/scratch"},
        ],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 50,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"rlhfspec.io/role": "generation"}},
                        },
                    }
                ]
            }
        },
    },
    "trainer": {
        "serviceAccountName": "trainer-identity",
        "volumes": [{"name": "cloud", "secret": {"secretName": "gcs-key", "defaultMode": 256}}],
        "volumeMounts": [{"name": "cloud", "mountPath": "/var/run/cloud", "readOnly": True}],
    },
    "coordinator": {
        "nodeSelector": {"pool": "cpu"},
        "labels": {"tier": "control"},
    },
}


def make_job(
    spec_changes: dict[str, Any] | None = None, labels: dict[str, str] | None = None
) -> RLHFJob:
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"]["namespace"] = "team-a"
    if labels:
        doc["metadata"]["labels"] = labels
    doc["spec"].update(copy.deepcopy(spec_changes or {}))
    return parse_rlhfjob(doc)


def owner_of(job: RLHFJob) -> Owner:
    return Owner(job.name, job.namespace, UID)


def pods_of(job: RLHFJob) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in builders.worker_pods(job, owner_of(job))}


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def refusals(spec_changes: dict[str, Any], labels: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        make_job(spec_changes, labels)
    return [str(e) for e in caught.value.errors]


GPU = {"cpu": 8, "memory": "64Gi", "gpu": 1}
CASES = {
    "cpu": {"podTemplateOverrides": OVERRIDES},
    "gpu-3-replicas": {
        "podTemplateOverrides": OVERRIDES,
        "generation": {**EXAMPLE["spec"]["generation"], "replicas": 3, "resources": GPU},
    },
    "external-redis": {
        "podTemplateOverrides": OVERRIDES,
        "coordinator": {
            "mode": "external",
            "url": "redis://redis.infra:6379/0",
            "passwordSecret": {"name": "redis-auth"},
        },
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_child_with_overrides_is_valid_kubernetes(case: str) -> None:
    job = make_job(CASES[case], labels={QUEUE: "team-a-queue"})
    owner = owner_of(job)
    objects = builders.children(job, owner, password="p", operator_namespace="rlhfspec-system")
    objects += builders.worker_pods(job, owner)
    for obj in objects:
        kubernetes_validate.validate(obj, "1.32.0", strict=True)


def test_role_entries_merge_over_default_and_keep_the_operators_pod() -> None:
    plain = pods_of(make_job())
    pods = pods_of(make_job({"podTemplateOverrides": OVERRIDES}))
    generation, trainer = pods["tiny-grpo-generation-0"], pods["tiny-grpo-trainer"]
    inference, coordinator_pod = pods["tiny-grpo-inference"], pods["tiny-grpo-coordinator"]

    # Maps: role wins per key; scalars: role replaces default.
    assert generation["spec"]["nodeSelector"] == {"pool": "rl", "zone": "b"}
    assert inference["spec"]["nodeSelector"] == {"pool": "rl", "zone": "a"}
    assert coordinator_pod["spec"]["nodeSelector"] == {"pool": "cpu", "zone": "a"}
    assert generation["spec"]["priorityClassName"] == "batch-high"
    assert trainer["spec"]["priorityClassName"] == "batch-low"
    assert trainer["spec"]["serviceAccountName"] == "trainer-identity"
    assert "serviceAccountName" not in inference["spec"]
    assert "affinity" in generation["spec"] and "affinity" not in trainer["spec"]
    assert all(p["spec"]["imagePullSecrets"] == [{"name": "regcred"}] for p in pods.values())
    # Env: the role's LOG_FORMAT replaces default's; HF_TOKEN comes from the Secret.
    assert env_of(generation)["LOG_FORMAT"] == {"name": "LOG_FORMAT", "value": "json"}
    assert env_of(trainer)["LOG_FORMAT"] == {"name": "LOG_FORMAT", "value": "text"}
    assert env_of(trainer)["HF_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "hf", "key": "token"}
    }
    assert generation["spec"]["containers"][0]["envFrom"] == [
        {"prefix": "S3_", "secretRef": {"name": "s3-creds"}}
    ]
    # Labels and annotations added; the operator's identity labels untouched.
    assert coordinator_pod["metadata"]["labels"]["tier"] == "control"
    assert coordinator_pod["metadata"]["labels"]["team"] == "rl"
    assert generation["metadata"]["annotations"] == {"example.com/owner": "rl-team"}

    for name, pod in pods.items():
        before, container = plain[name], pod["spec"]["containers"][0]
        original = before["spec"]["containers"][0]
        # Everything the operator set is still there, unchanged and first.
        assert {
            k: v for k, v in pod["metadata"]["labels"].items() if k in before["metadata"]["labels"]
        } == before["metadata"]["labels"]
        assert container["env"][: len(original["env"])] == original["env"]
        mounts = container["volumeMounts"]
        assert mounts[: len(original["volumeMounts"])] == original["volumeMounts"]
        volumes = pod["spec"]["volumes"]
        assert volumes[: len(before["spec"]["volumes"])] == before["spec"]["volumes"]
        for key in ("command", "securityContext", "resources", "image"):
            assert container[key] == original[key]
        for key in ("securityContext", "automountServiceAccountToken", "restartPolicy"):
            assert pod["spec"][key] == before["spec"][key]
    assert [m["mountPath"] for m in generation["spec"]["containers"][0]["volumeMounts"][-2:]] == [
        "/models",
        "/scratch",
    ]


def test_tolerations_add_to_the_gpu_toleration_without_duplicates() -> None:
    spec = {"podTemplateOverrides": OVERRIDES, **CASES["gpu-3-replicas"]}
    pods = pods_of(make_job(spec))
    dedicated = OVERRIDES["default"]["tolerations"][0]
    generation = pods["tiny-grpo-generation-1"]["spec"]["tolerations"]
    # The user repeated the automatic GPU toleration: it appears once.
    assert generation == [GPU_TOLERATION, dedicated]
    assert pods["tiny-grpo-trainer"]["spec"]["tolerations"] == [dedicated]
    assert "tolerations" not in pods_of(make_job())["tiny-grpo-trainer"]["spec"]


def test_kueue_queue_label_puts_every_worker_pod_in_one_gang() -> None:
    job = make_job(
        {"generation": {**EXAMPLE["spec"]["generation"], "replicas": 3}},
        labels={QUEUE: "team-a-queue", "other": "x"},
    )
    pods = pods_of(job)
    assert len(pods) == 6  # coordinator, 3 generation, inference, trainer
    for pod in pods.values():
        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        assert labels[QUEUE] == "team-a-queue"
        assert labels["kueue.x-k8s.io/pod-group-name"] == "tiny-grpo"
        assert annotations["kueue.x-k8s.io/pod-group-total-count"] == "6"
        assert "other" not in labels  # only the queue label is copied from the job
    # The managed Redis is not a member: Kueue would otherwise hold it and the gang forever.
    deployment = managed_redis.redis_deployment(job, owner_of(job))
    assert not any(
        k.startswith("kueue.") for k in deployment["spec"]["template"]["metadata"]["labels"]
    )
    # Without the label: no Kueue metadata anywhere.
    for pod in pods_of(make_job()).values():
        assert not any(k.startswith("kueue.") for k in pod["metadata"]["labels"])
        assert "annotations" not in pod["metadata"]


def test_the_managed_redis_is_placed_like_the_coordinator() -> None:
    job = make_job(
        {
            "podTemplateOverrides": {
                "coordinator": {
                    "nodeSelector": {"pool": "cpu"},
                    "tolerations": [{"key": "cpu-only", "operator": "Exists"}],
                    "env": [{"name": "EXTRA", "value": "1"}],
                    "labels": {"tier": "control"},
                }
            }
        }
    )
    deployment = managed_redis.redis_deployment(job, owner_of(job))
    template = deployment["spec"]["template"]
    assert template["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert template["spec"]["tolerations"] == [{"key": "cpu-only", "operator": "Exists"}]
    assert template["metadata"]["labels"]["tier"] == "control"
    # The selector still matches the template; the coordinator's env is not Redis's.
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert all("env" not in c for c in template["spec"]["containers"])
    kubernetes_validate.validate(deployment, "1.32.0", strict=True)


REFUSED = [
    ("command", {"trainer": {"command": ["sh", "-c", "id"]}}, "trainer.command"),
    ("args", {"generation": {"args": ["--x"]}}, "generation.args"),
    ("security-context", {"default": {"securityContext": {}}}, "default.securityContext"),
    ("image", {"inference": {"image": "evil:1"}}, "inference.image"),
    (
        "worker-env",
        {"trainer": {"env": [{"name": "RLHFSPEC_ROLE", "value": "x"}]}},
        "trainer.env[0].name",
    ),
    (
        "redis-password-env",
        {
            "coordinator": {
                "env": [
                    {"name": "LOG", "value": "1"},
                    {"name": "RLHFSPEC_REDIS_PASSWORD", "value": "x"},
                ]
            }
        },
        "coordinator.env[1].name",
    ),
    ("home-env", {"default": {"env": [{"name": "HOME", "value": "/"}]}}, "default.env[0].name"),
    (
        "secret-ref-no-key",
        {"trainer": {"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf"}}}]}},
        "trainer.env[0].valueFrom.secretKeyRef.key",
    ),
    (
        "env-from-prefix",
        {"default": {"envFrom": [{"prefix": "RLHFSPEC_", "secretRef": {"name": "s"}}]}},
        "default.envFrom[0].prefix",
    ),
    (
        "operator-volume",
        {"trainer": {"volumes": [{"name": "storage", "emptyDir": {}}]}},
        "trainer.volumes[0].name",
    ),
    (
        "reward-volume",
        {"trainer": {"volumes": [{"name": "reward-modules-0", "emptyDir": {}}]}},
        "trainer.volumes[0].name",
    ),
    (
        "mount-data",
        {
            "trainer": {
                "volumes": [{"name": "v", "emptyDir": {}}],
                "volumeMounts": [{"name": "v", "mountPath": "/data"}],
            }
        },
        "trainer.volumeMounts[0].mountPath",
    ),
    (
        "mount-inside-tmp",
        {
            "trainer": {
                "volumes": [{"name": "v", "emptyDir": {}}],
                "volumeMounts": [{"name": "v", "mountPath": "/tmp/cache"}],
            }
        },
        "trainer.volumeMounts[0].mountPath",
    ),
    (
        "mount-above-config",
        {
            "trainer": {
                "volumes": [{"name": "v", "emptyDir": {}}],
                "volumeMounts": [{"name": "v", "mountPath": "/etc"}],
            }
        },
        "trainer.volumeMounts[0].mountPath",
    ),
    (
        "mount-shm",
        {
            "trainer": {
                "volumes": [{"name": "v", "emptyDir": {}}],
                "volumeMounts": [{"name": "v", "mountPath": "/dev/shm/"}],
            }
        },
        "trainer.volumeMounts[0].mountPath",
    ),
    (
        "mount-unknown-volume",
        {"generation": {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}},
        "generation.volumeMounts[0].name",
    ),
    (
        "host-path",
        {"trainer": {"volumes": [{"name": "v", "hostPath": {"path": "/"}}]}},
        "trainer.volumes[0].hostPath",
    ),
    (
        "two-sources",
        {"trainer": {"volumes": [{"name": "v", "emptyDir": {}, "secret": {"secretName": "s"}}]}},
        "trainer.volumes[0]",
    ),
    (
        "operator-label",
        {"default": {"labels": {"rlhfspec.io/job": "other"}}},
        "default.labels.rlhfspec.io/job",
    ),
    (
        "app-label",
        {"trainer": {"labels": {"app.kubernetes.io/managed-by": "me"}}},
        "trainer.labels.app.kubernetes.io/managed-by",
    ),
    ("kueue-label", {"generation": {"labels": {QUEUE: "other"}}}, f"generation.labels.{QUEUE}"),
    (
        "seccomp-annotation",
        {"trainer": {"annotations": {"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}}},
        "trainer.annotations.seccomp.security.alpha.kubernetes.io/pod",
    ),
    (
        "toleration-exists-value",
        {"default": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
        "default.tolerations[0].value",
    ),
    ("unknown-role", {"redis": {"labels": {"a": "b"}}}, "redis"),
]


@pytest.mark.parametrize(
    ("override", "field"), [(o, f) for _, o, f in REFUSED], ids=[c for c, _, _ in REFUSED]
)
def test_an_override_of_what_the_operator_owns_is_refused_naming_the_field(
    override: dict[str, Any], field: str
) -> None:
    lines = refusals({"podTemplateOverrides": override})
    path = f"spec.podTemplateOverrides.{field}: "
    assert any(line.startswith(path) for line in lines), lines
    # Every line says what is allowed, in parentheses.
    assert all(line.endswith(")") for line in lines), lines


def test_ttl_deletes_job_needs_a_ttl() -> None:
    (line,) = refusals({"ttlDeletesJob": True})
    assert line.startswith("spec.ttlDeletesJob: ") and "ttlSecondsAfterFinished" in line
    job = make_job({"ttlSecondsAfterFinished": 30, "ttlDeletesJob": True})
    assert job.spec.ttl_seconds_after_finished == 30 and job.spec.ttl_deletes_job


def test_the_reserved_names_cover_everything_the_builders_set() -> None:
    job = make_job(
        {
            "coordinator": {
                "mode": "external",
                "url": "rediss://redis.infra:6380/0",
                "caConfigMap": {"name": "redis-ca"},
            },
            "reward": {
                "type": "function",
                "function": "my_reward:score",
                "configMap": "my-reward-code",
            },
        }
    )
    for pod in pods_of(job).values():
        container = pod["spec"]["containers"][0]
        for var in container["env"]:
            name = var["name"]
            assert name.startswith(RESERVED_ENV_PREFIX) or name in RESERVED_ENV_NAMES, name
        for volume in pod["spec"]["volumes"]:
            name = volume["name"]
            assert name in RESERVED_VOLUMES or name.startswith(RESERVED_VOLUME_PREFIX), name
        for mount in container["volumeMounts"]:
            path = mount["mountPath"]
            assert any(path == p or path.startswith(p + "/") for p in RESERVED_MOUNT_PATHS), path
    names = {v["name"] for p in pods_of(job).values() for v in p["spec"]["volumes"]}
    assert {"redis-ca", "reward-modules-0"} <= names  # the case exercised both


def test_the_scheduling_example_uses_every_new_field_and_validates() -> None:
    doc = yaml.safe_load(SCHEDULING_EXAMPLE.read_text())
    job = parse_rlhfjob(doc)
    spec = job.spec
    assert spec.ttl_seconds_after_finished is not None and spec.ttl_deletes_job
    assert overrides.kueue_queue(job) is not None
    used = set()
    assert spec.pod_template_overrides is not None
    for entry in ("default", "coordinator", "generation", "inference", "trainer"):
        override = getattr(spec.pod_template_overrides, entry)
        if override is not None:
            used |= set(override.to_wire())
    assert used == {
        "labels",
        "annotations",
        "nodeSelector",
        "tolerations",
        "affinity",
        "priorityClassName",
        "serviceAccountName",
        "imagePullSecrets",
        "env",
        "envFrom",
        "volumes",
        "volumeMounts",
    }
    owner = owner_of(job)
    for pod in builders.worker_pods(job, owner):
        kubernetes_validate.validate(pod, "1.32.0", strict=True)


NOW = datetime.datetime(2026, 12, 4, 12, 0, 0, tzinfo=datetime.UTC)


def _finished(seconds_ago: int, phase: Phase = Phase.SUCCEEDED) -> RLHFJobStatus:
    moment = NOW - datetime.timedelta(seconds=seconds_ago)
    return RLHFJobStatus(phase=phase, completion_time=moment.strftime("%Y-%m-%dT%H:%M:%SZ"))


def test_ttl_counts_from_completion_and_stops_once_cleaned_up() -> None:
    assert ttl.seconds_left(60, _finished(10), NOW) == 50
    assert ttl.seconds_left(60, _finished(90, Phase.FAILED), NOW) == -30
    assert ttl.seconds_left(None, _finished(90), NOW) is None
    assert ttl.seconds_left(0, RLHFJobStatus(phase=Phase.RUNNING), NOW) is None
    marked = ttl.mark_cleaned_up(_finished(90), ["Pod a", "Secret b"], NOW, 1)
    (done,) = [c for c in marked.conditions if c.type == ConditionType.CHILDREN_DELETED]
    assert done.status is ConditionStatus.TRUE and done.reason == "TTLExpired"
    assert "2 child object(s)" in done.message
    assert ttl.seconds_left(60, marked, NOW) is None


def test_ttl_deletes_the_claim_the_job_created_but_never_the_users() -> None:
    owned = make_job({"storage": {"size": "5Gi"}})
    kinds = {(o["kind"], o["metadata"]["name"]) for o in ttl.owned_children(owned, owner_of(owned))}
    assert ("PersistentVolumeClaim", "tiny-grpo-storage") in kinds
    assert ("Pod", "tiny-grpo-coordinator") in kinds and ("Secret", "tiny-grpo-kv") in kinds
    assert ("Deployment", "tiny-grpo-redis") in kinds and ("ConfigMap", "tiny-grpo-config") in kinds
    users = make_job({"storage": {"claimName": "shared"}})
    kinds = {o["kind"] for o in ttl.owned_children(users, owner_of(users))}
    assert "PersistentVolumeClaim" not in kinds
    # Pods go first: they free the accelerators and hold mounts of the rest.
    first = ttl.owned_children(owned, owner_of(owned))[0]
    assert first["kind"] == "Pod"


def _secret(labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": "s", "labels": labels}, "data": {"token": "eA=="}}


def test_secrets_handed_to_pods_must_exist_and_be_opted_in() -> None:
    refs = {
        "default": {
            "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}],
            "envFrom": [{"secretRef": {"name": "aws", "optional": True}}],
        },
        "trainer": {
            "volumes": [{"name": "key", "secret": {"secretName": "gcs"}}],
            "volumeMounts": [{"name": "key", "mountPath": "/var/run/key"}],
        },
    }
    job = make_job({"podTemplateOverrides": refs})
    fields = {name: field for field, name, _ in overrides.secret_references(job)}
    assert fields == {
        "hf": "spec.podTemplateOverrides.default.env[0].valueFrom.secretKeyRef.name",
        "aws": "spec.podTemplateOverrides.default.envFrom[0].secretRef.name",
        "gcs": "spec.podTemplateOverrides.trainer.volumes[0].secret.secretName",
    }
    opted = _secret({overrides.SECRET_OPT_IN_LABEL: "true"})
    assert overrides.secret_reference_errors(job, {"hf": opted, "aws": None, "gcs": opted}) == []
    errors = overrides.secret_reference_errors(job, {"hf": _secret({}), "aws": None, "gcs": None})
    # hf is not opted in; gcs is missing; aws is missing but optional.
    assert [e.path for e in errors] == [fields["hf"], fields["gcs"]]
    assert "does not carry the label rlhfspec.io/pod-secret=true" in errors[0].problem
    assert "not found" in errors[1].problem
    assert overrides.secret_reference_errors(make_job(), {}) == []


def test_gated_pods_make_the_job_queued_and_admission_restarts_the_startup_clock() -> None:
    gated = pod_view(
        {
            "metadata": {"name": "j-trainer", "labels": {"rlhfspec.io/role": "trainer"}},
            "spec": {"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]},
            "status": {"phase": "Pending"},
        }
    )
    free = pod_view({"metadata": {"name": "j-inference"}, "status": {"phase": "Pending"}})
    assert gated.gated and not free.gated
    status = RLHFJobStatus(phase=Phase.INITIALIZING)
    assert queueing.apply_queue(status, [gated, gated], NOW, 1)
    assert queueing.admitted_since(status) is None  # still queued
    # One pod not gated (or not created yet): no longer all held by the queue.
    later = NOW + datetime.timedelta(seconds=30)
    assert not queueing.apply_queue(status, [gated, free], later, 1)
    assert queueing.admitted_since(status) == later
    assert not queueing.apply_queue(status, [gated, None], later, 1)
    # Never queued: no condition at all.
    fresh = RLHFJobStatus(phase=Phase.INITIALIZING)
    assert not queueing.apply_queue(fresh, [free], NOW, 1) and fresh.conditions == []


def test_env_from_cannot_switch_a_pod_into_local_mode() -> None:
    pods = pods_of(make_job({"podTemplateOverrides": OVERRIDES}))
    generation, trainer = pods["tiny-grpo-generation-0"], pods["tiny-grpo-trainer"]
    # The generation pods import a Secret's keys (envFrom): the local-mode switch is pinned
    # off by an explicit env var, which Kubernetes ranks above envFrom.
    assert env_of(generation)["RLHFSPEC_LOCAL"] == {"name": "RLHFSPEC_LOCAL", "value": "0"}
    assert "RLHFSPEC_LOCAL" not in env_of(trainer)  # no envFrom there: nothing to pin
