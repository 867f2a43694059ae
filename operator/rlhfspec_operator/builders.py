"""Pure builders: a parsed RLHFJob -> the manifests of its children (no API calls, no kopf).

Where it sits: the create/resume handlers call :func:`children` once per job, the reconcile
timer calls :func:`worker_pod` for each pod it (re)creates. Everything here is a function of
the job and its owner identity, so unit tests validate every manifest offline with
``kubernetes-validate`` and the handlers stay thin. The managed Redis lives in ``managed_redis``.

The worker contract (what ``rlhfspec worker <role>`` can rely on) is :func:`worker_env` plus
the mounts in :func:`worker_pod`: job config at ``/etc/rlhfspec/job.yaml`` (read-only), shared
storage at ``/data``, scratch at ``/tmp`` and ``/dev/shm``, metrics on port 9400, and each
function reward's ConfigMap (its module files) under ``/etc/rlhfspec-rewards/<name>``, on
PYTHONPATH. Every worker pod mounts those: each one's preflight imports the function. A
``rediss://`` coordinator's CA (``spec.coordinator.caConfigMap``) is mounted under
``/etc/rlhfspec-redis-ca``; ``/dev/shm`` is bounded (:func:`shm_size_limit`).
Generation pods also get the job's KV key (``RLHFSPEC_KV_SECRET``, from the ``<job>-kv``
Secret :func:`kv_secret` builds): peers pull each other's KV snapshots only with it.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

import yaml

from rlhfspec_api.errors import FieldError
from rlhfspec_api.manifest import RLHFJob
from rlhfspec_api.models import Resources
from rlhfspec_api.quantity import parse_quantity
from rlhfspec_operator import managed_redis, overrides
from rlhfspec_operator.fetch_init import fetch_init_container
from rlhfspec_operator.naming import (
    CONFIG_DIR,
    CONFIG_KEY,
    COORDINATOR,
    GENERATION,
    INFERENCE,
    KV_PORT,
    LABEL_INDEX,
    METRICS_PORT,
    STORAGE_DIR,
    TRAINER,
    WORKER_ROLES,
    Owner,
    config_map_name,
    metadata,
    pod_name,
    role_service_name,
    selector,
    storage_claim_name,
)

# The coordinator has no resources in the spec: it plans and routes, it holds no model.
COORDINATOR_RESOURCES = Resources(cpu="500m", memory="1Gi")
# Workers are non-root; the image's user is assumed to be 1000 (see Dockerfile).
WORKER_UID = 1000
REWARD_MODULES_DIR = "/etc/rlhfspec-rewards"
"""Function rewards' ConfigMaps are mounted below it, one directory per ConfigMap."""
REDIS_CA_DIR = "/etc/rlhfspec-redis-ca"
"""``spec.coordinator.caConfigMap`` is mounted here (the CA verifying a rediss:// Redis)."""
SHM_FRACTION = 2
"""/dev/shm may use at most 1/SHM_FRACTION of the container's memory."""


def shm_size_limit(resources: Resources) -> str:
    """A bound on /dev/shm (memory-backed): half the container's memory, in MiB. Without one a
    runaway writer fills the node's memory, not just its own limit's worth."""
    mib = int(parse_quantity(resources.memory) / SHM_FRACTION / (1 << 20))
    return f"{max(mib, 64)}Mi"


def reward_config_maps(job: RLHFJob) -> list[str]:
    """The ConfigMaps holding function rewards' modules, each once, in spec order."""
    names = [term.config_map for term in job.spec.reward_terms if term.config_map]
    return list(dict.fromkeys(names))


KV_SECRET_KEY = "key"


def kv_secret_name(job: str) -> str:
    """The job's KV key: generation workers authorise snapshot pulls and seal snapshots
    with it (``rlhfspec_workers.generation.kv_auth``)."""
    return f"{job}-kv"


def new_kv_key() -> str:
    return secrets.token_hex(32)  # 32 random bytes


def kv_secret(job: RLHFJob, owner: Owner, key: str) -> dict[str, Any]:
    """Owned by the job (garbage-collected with it), read only by its generation pods' env."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(owner, kv_secret_name(job.name), GENERATION),
        "type": "Opaque",
        "data": {KV_SECRET_KEY: base64.b64encode(key.encode()).decode()},
    }


def _reward_module_dirs(job: RLHFJob) -> list[str]:
    return [f"{REWARD_MODULES_DIR}/{name}" for name in reward_config_maps(job)]


def cluster_errors(job: RLHFJob) -> list[FieldError]:
    """Valid for ``rlhfspec run`` but not on a cluster: the operator fails such jobs."""
    errors = []
    if job.spec.storage.path is not None:
        errors.append(
            FieldError(
                "spec.storage.path",
                "a local directory only works with `rlhfspec run`",
                "on a cluster set storage.size (a new claim) or storage.claimName",
            )
        )
    return errors


def config_map(job: RLHFJob, owner: Owner) -> dict[str, Any]:
    """The parsed, fully defaulted manifest: workers read it instead of re-parsing user YAML."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, config_map_name(job.name), "config"),
        "data": {CONFIG_KEY: render_config(job)},
    }


def render_config(job: RLHFJob) -> str:
    return yaml.safe_dump(job.to_manifest(), sort_keys=False)


def claim_name(job: RLHFJob) -> str:
    storage = job.spec.storage
    return storage.claim_name or storage_claim_name(job.name)


def storage_claim(job: RLHFJob, owner: Owner) -> dict[str, Any] | None:
    """A claim owned by the job (``storage.size``), or None when the user brings one."""
    storage = job.spec.storage
    if storage.size is None:
        return None
    spec: dict[str, Any] = {
        # Every pod mounts it: the trainer writes checkpoints and weights, generation and
        # inference read them. Pods land on different nodes, hence ReadWriteMany.
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class_name:
        spec["storageClassName"] = storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(owner, storage_claim_name(job.name), "storage"),
        "spec": spec,
    }


def role_service(job: RLHFJob, owner: Owner, role: str) -> dict[str, Any]:
    """Headless: stable per-pod DNS (``<job>-generation-0.<job>-generation``) and scraping."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, role_service_name(job.name, role), role),
        "spec": {
            "clusterIP": "None",
            # Workers register in DNS before they are ready: peers find each other at start.
            "publishNotReadyAddresses": True,
            "selector": selector(job.name, role),
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}],
        },
    }


def children(
    job: RLHFJob,
    owner: Owner,
    *,
    password: str,
    operator_namespace: str | None,
    kv_key: str | None = None,
) -> list[dict[str, Any]]:
    """Every child except the worker pods, in creation order (config, KV key and Redis
    first). Without ``kv_key`` a new one is drawn: only the first create of the Secret lands
    (a later one is a 409), so a running job's key never changes under its pods."""
    objects = [config_map(job, owner), kv_secret(job, owner, kv_key or new_kv_key())]
    objects += managed_redis.manifests(
        job, owner, password=password, operator_namespace=operator_namespace
    )
    objects += [role_service(job, owner, role) for role in WORKER_ROLES]
    claim = storage_claim(job, owner)
    if claim is not None:
        objects.append(claim)
    return objects


def worker_pods(job: RLHFJob, owner: Owner) -> list[dict[str, Any]]:
    pods = [worker_pod(job, owner, COORDINATOR)]
    pods += [worker_pod(job, owner, GENERATION, i) for i in range(job.spec.generation.replicas)]
    pods += [worker_pod(job, owner, INFERENCE), worker_pod(job, owner, TRAINER)]
    return pods


def role_resources(job: RLHFJob, role: str) -> Resources:
    spec = job.spec
    return {
        COORDINATOR: COORDINATOR_RESOURCES,
        GENERATION: spec.generation.resources,
        INFERENCE: spec.inference.resources,
        TRAINER: spec.trainer.resources,
    }[role]


def _resources(resources: Resources) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": resources.cpu, "memory": resources.memory}
    if resources.gpu:
        amounts[resources.gpu_resource_name] = str(resources.gpu)
    # Requests equal limits: Guaranteed QoS, so a busy node never evicts a training pod first.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def worker_env(job: RLHFJob, role: str, index: int) -> list[dict[str, Any]]:
    """The environment contract of ``rlhfspec worker <role>``."""
    env: list[dict[str, Any]] = [
        {"name": "RLHFSPEC_JOB", "value": job.name},
        {"name": "RLHFSPEC_NAMESPACE", "value": job.namespace},
        {"name": "RLHFSPEC_ROLE", "value": role},
        {"name": "RLHFSPEC_WORKER_INDEX", "value": str(index)},
        {"name": "RLHFSPEC_REPLICAS", "value": str(job.spec.generation.replicas)},
        {"name": "RLHFSPEC_REDIS_URL", "value": managed_redis.redis_url(job)},
    ]
    secret = managed_redis.password_ref(job)
    source = "no password (spec.coordinator.passwordSecret is not set)"
    if secret is not None:
        name, key = secret
        source = f"Secret {job.namespace}/{name}, key {key}"
        env.append(
            {
                "name": "RLHFSPEC_REDIS_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": name, "key": key}},
            }
        )
    # Named in the worker's error when Redis refuses the password (it fails at once).
    env.append({"name": "RLHFSPEC_REDIS_PASSWORD_SOURCE", "value": source})
    ca = job.spec.coordinator.ca_config_map
    if ca is not None:
        env.append({"name": "RLHFSPEC_REDIS_CA_FILE", "value": f"{REDIS_CA_DIR}/{ca.key}"})
    env += [
        {"name": "RLHFSPEC_JOB_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "RLHFSPEC_STORAGE", "value": STORAGE_DIR},
        {"name": "RLHFSPEC_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "RLHFSPEC_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        # The root filesystem is read-only: caches (tiny models, HF, torch) go to /tmp.
        {"name": "HOME", "value": "/tmp"},
    ]
    module_dirs = _reward_module_dirs(job)
    if module_dirs:
        env.append({"name": "PYTHONPATH", "value": ":".join(module_dirs)})
    if role == GENERATION:
        # Peers pull migrating samples' KV snapshots from here, by the pod's stable DNS name.
        host = f"{pod_name(job.name, role, index)}.{role_service_name(job.name, role)}"
        env += [
            {"name": "RLHFSPEC_KV_PORT", "value": str(KV_PORT)},
            {"name": "RLHFSPEC_KV_HOST", "value": f"{host}.{job.namespace}.svc"},
            {
                "name": "RLHFSPEC_KV_SECRET",
                "valueFrom": {
                    "secretKeyRef": {"name": kv_secret_name(job.name), "key": KV_SECRET_KEY}
                },
            },
        ]
    return env


def worker_pod(job: RLHFJob, owner: Owner, role: str, index: int = 0) -> dict[str, Any]:
    resources = role_resources(job, role)
    name = pod_name(job.name, role, index)
    meta = metadata(owner, name, role)
    meta["labels"][LABEL_INDEX] = str(index)
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {
                "name": config_map_name(job.name),
                "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
            },
        },
        {"name": "storage", "persistentVolumeClaim": {"claimName": claim_name(job)}},
        {"name": "tmp", "emptyDir": {}},
        # torch and vLLM share tensors between processes through /dev/shm (64Mi by default).
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size_limit(resources)}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "storage", "mountPath": STORAGE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    ca = job.spec.coordinator.ca_config_map
    if ca is not None:
        volumes.append({"name": "redis-ca", "configMap": {"name": ca.name}})
        mounts.append({"name": "redis-ca", "mountPath": REDIS_CA_DIR, "readOnly": True})
    for index, (config_name, path) in enumerate(
        zip(reward_config_maps(job), _reward_module_dirs(job), strict=True)
    ):
        volume = f"reward-modules-{index}"
        volumes.append({"name": volume, "configMap": {"name": config_name}})
        mounts.append({"name": volume, "mountPath": path, "readOnly": True})
    spec: dict[str, Any] = {
        # The operator recreates failed pods itself, counting them against backoffLimit.
        "restartPolicy": "Never",
        "hostname": name,
        "subdomain": role_service_name(job.name, role),
        # Workers never call the Kubernetes API, and service env vars would only add noise.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "fsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": role,
                "image": job.spec.image,
                "command": ["rlhfspec", "worker", role],
                "env": worker_env(job, role, index),
                "ports": [{"name": "metrics", "containerPort": METRICS_PORT}]
                + ([{"name": "kv", "containerPort": KV_PORT}] if role == GENERATION else []),
                "resources": _resources(resources),
                "volumeMounts": mounts,
                # A worker's last words (e.g. Redis refused the password from Secret X, key Y)
                # become the pod's termination message, which the job's status quotes.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": volumes,
    }
    if resources.gpu:
        spec["tolerations"] = [
            {"key": resources.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"}
        ]
    # hf:// and https:// models and datasets are downloaded into /data before the worker starts.
    fetch = fetch_init_container(job, spec["containers"][0])
    if fetch is not None:
        spec["initContainers"] = [fetch]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    # Last: spec.podTemplateOverrides and Kueue's gang metadata, added next to all of the above.
    return overrides.apply_to_worker_pod(pod, job, role)
