"""Pure builders of the job's Redis: password Secret, Deployment, Service, NetworkPolicy.

In spec terms this Redis is the job's "coordinator" (``spec.coordinator``: managed or
external); in the code "coordinator" names the worker process that plans and routes, so the
module that builds its Redis is named for what it builds.

Where it sits: ``builders.children`` includes :func:`manifests` in managed mode; the worker
env (``builders.worker_env``) and the operator's progress reader (``redis_progress``) get the
URL and password location from :func:`redis_url` and :func:`password_ref`, so the two sides
of every connection agree. In external mode nothing is created: the user's Redis and (optional)
password Secret are used as given. The managed Redis keeps its AOF in ``redis/`` on the job's
claim (not an emptyDir), checked and, for a tail cut off by a crash, repaired by an init
container before Redis starts (``rlhfspec_api.redis_conf``).
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

from rlhfspec_api import redis_conf
from rlhfspec_api.manifest import RLHFJob
from rlhfspec_api.spec import CoordinatorMode
from rlhfspec_operator import overrides
from rlhfspec_operator.naming import (
    LABEL_JOB,
    OPERATOR_LABELS,
    PASSWORD_KEY,
    REDIS,
    REDIS_PORT,
    Owner,
    metadata,
    redis_name,
    selector,
    storage_claim_name,
)

REDIS_CONFIG_KEY = "redis.conf"
REDIS_UID = 999  # the `redis` user of the official images
REDIS_DATA_DIR = "/data"
"""The Redis container's data dir: the ``redis/`` folder of the job's claim."""
REDIS_CLAIM_SUBPATH = "redis"
CLAIM_MOUNT = "/storage"
"""Where the AOF check (init container) mounts the whole claim, to create ``redis/``."""


def managed(job: RLHFJob) -> bool:
    return job.spec.coordinator.mode is CoordinatorMode.MANAGED


def redis_url(job: RLHFJob) -> str:
    if not managed(job):
        url = job.spec.coordinator.url
        assert url is not None  # the spec's rules require it in external mode
        return url
    return f"redis://{redis_name(job.name)}.{job.namespace}.svc:{REDIS_PORT}/0"


def password_ref(job: RLHFJob) -> tuple[str, str] | None:
    """(Secret name, key) holding the Redis password, or None for a password-less Redis."""
    if managed(job):
        return redis_name(job.name), PASSWORD_KEY
    ref = job.spec.coordinator.password_secret
    return (ref.name, ref.key) if ref is not None else None


def new_password() -> str:
    return secrets.token_urlsafe(32)


def decode_secret_value(secret: dict[str, Any], key: str) -> str | None:
    value = (secret.get("data") or {}).get(key)
    if value is None:
        plain = (secret.get("stringData") or {}).get(key)
        return None if plain is None else str(plain)
    return base64.b64decode(value).decode()


def redis_config(password: str, data_dir: str = REDIS_DATA_DIR) -> str:
    """The shared config (AOF fsynced on every write; see ``rlhfspec_api.redis_conf``), its
    data on the job's claim: a restarted or rescheduled Redis pod loses nothing acknowledged.
    ``data_dir`` is the container's; tests render it for a directory of their own."""
    return redis_conf.redis_config(port=REDIS_PORT, password=password, data_dir=data_dir)


def _claim_name(job: RLHFJob) -> str:
    return job.spec.storage.claim_name or storage_claim_name(job.name)


def password_secret(job: RLHFJob, owner: Owner, password: str) -> dict[str, Any]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(owner, redis_name(job.name), REDIS),
        "type": "Opaque",
        "data": {PASSWORD_KEY: b64(password), REDIS_CONFIG_KEY: b64(redis_config(password))},
    }


def redis_service(job: RLHFJob, owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, redis_name(job.name), REDIS),
        "spec": {
            "selector": selector(job.name, REDIS),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}],
        },
    }


def redis_deployment(job: RLHFJob, owner: Owner) -> dict[str, Any]:
    meta = metadata(owner, redis_name(job.name), REDIS)
    pod_labels = dict(meta["labels"])
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            # Never two Redis at once: workers would split between two empty states.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(job.name, REDIS)},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": REDIS_UID,
                        "runAsGroup": REDIS_UID,
                        "fsGroup": REDIS_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    # Before Redis loads its AOF: create redis/ on the claim (as the redis
                    # user, so it can write there), repair a tail cut off by a crash, and
                    # fail the pod with the reason on anything else (never load as empty).
                    "initContainers": [
                        {
                            "name": "aof-check",
                            "image": job.spec.coordinator.redis_image,
                            "command": redis_conf.aof_check_command(
                                f"{CLAIM_MOUNT}/{REDIS_CLAIM_SUBPATH}"
                            ),
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "64Mi"},
                                "limits": {"memory": "256Mi"},
                            },
                            "volumeMounts": [{"name": "data", "mountPath": CLAIM_MOUNT}],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "containers": [
                        {
                            "name": REDIS,
                            "image": job.spec.coordinator.redis_image,
                            "command": ["redis-server", f"/etc/redis/{REDIS_CONFIG_KEY}"],
                            "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                            "readinessProbe": {
                                "tcpSocket": {"port": "redis"},
                                "periodSeconds": 5,
                            },
                            "livenessProbe": {
                                "tcpSocket": {"port": "redis"},
                                "periodSeconds": 20,
                                "failureThreshold": 6,
                            },
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "256Mi"},
                                "limits": {"memory": "1Gi"},
                            },
                            "volumeMounts": [
                                {"name": "config", "mountPath": "/etc/redis", "readOnly": True},
                                {
                                    "name": "data",
                                    "mountPath": REDIS_DATA_DIR,
                                    "subPath": REDIS_CLAIM_SUBPATH,
                                },
                            ],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "volumes": [
                        {
                            "name": "config",
                            "secret": {
                                "secretName": redis_name(job.name),
                                "items": [{"key": REDIS_CONFIG_KEY, "path": REDIS_CONFIG_KEY}],
                            },
                        },
                        {"name": "data", "persistentVolumeClaim": {"claimName": _claim_name(job)}},
                    ],
                },
            },
        },
    }
    # Placed like the coordinator (spec.podTemplateOverrides.coordinator's scheduling fields).
    spec = deployment["spec"]
    spec["template"] = overrides.apply_to_redis_template(spec["template"], job)
    return deployment


def network_policy(job: RLHFJob, owner: Owner, operator_namespace: str | None) -> dict[str, Any]:
    """Only the job's own pods (and the operator, for progress) may open Redis connections."""
    peers: list[dict[str, Any]] = [{"podSelector": {"matchLabels": {LABEL_JOB: job.name}}}]
    if operator_namespace:
        peers.append(
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": operator_namespace}
                },
                "podSelector": {"matchLabels": dict(OPERATOR_LABELS)},
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(owner, redis_name(job.name), REDIS),
        "spec": {
            "podSelector": {"matchLabels": selector(job.name, REDIS)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": REDIS_PORT}]}],
        },
    }


def manifests(
    job: RLHFJob, owner: Owner, *, password: str, operator_namespace: str | None
) -> list[dict[str, Any]]:
    """The managed Redis (Secret first: the Deployment mounts it); nothing in external mode."""
    if not managed(job):
        return []
    return [
        password_secret(job, owner, password),
        network_policy(job, owner, operator_namespace),
        redis_service(job, owner),
        redis_deployment(job, owner),
    ]
