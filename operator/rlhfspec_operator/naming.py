"""Names, labels and owner references of everything the operator creates for an RLHFJob.

Where it sits: shared by the pure builders (``builders``, ``managed_redis``), the status logic
(which pods should exist) and the handlers (which index key a pod belongs to). Names are
deterministic (``<job>-<role>[-<index>]``) so that a create after an operator restart hits 409
instead of creating a duplicate; ``parse_rlhfjob`` caps job names at 40 characters so the
longest child name stays a valid DNS-1035 label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhfspec_api import API_GROUP, API_VERSION, KIND

COORDINATOR = "coordinator"
GENERATION = "generation"
INFERENCE = "inference"
TRAINER = "trainer"
WORKER_ROLES = (COORDINATOR, GENERATION, INFERENCE, TRAINER)
"""Roles of the pods that run ``rlhfspec worker <role>``."""
REDIS = "redis"

LABEL_JOB = f"{API_GROUP}/job"
LABEL_ROLE = f"{API_GROUP}/role"
LABEL_INDEX = f"{API_GROUP}/worker-index"
APP_NAME = "rlhfspec"
MANAGED_BY = "rlhfspec-operator"
OPERATOR_LABELS = {"app.kubernetes.io/part-of": APP_NAME, "app.kubernetes.io/component": "operator"}
"""Labels every operator pod carries (``install`` and the Helm chart set them); the Redis
NetworkPolicy admits pods with them, since the progress timer reads Redis."""

CONFIG_KEY = "job.yaml"
CONFIG_DIR = "/etc/rlhfspec"
STORAGE_DIR = "/data"
METRICS_PORT = 9400
KV_PORT = 9401
"""Generation pods serve KV snapshots of samples they migrate away on it (peer to peer)."""
REDIS_PORT = 6379
PASSWORD_KEY = "password"


@dataclass(frozen=True)
class Owner:
    """The RLHFJob that owns the children: what ``ownerReferences`` and names need."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        # controller=true: `kubectl get pods` shows the job as the pod's controller, and the
        # garbage collector deletes children when the job goes (blockOwnerDeletion keeps the
        # job around until a foreground delete has removed them).
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def config_map_name(job: str) -> str:
    return f"{job}-config"


def redis_name(job: str) -> str:
    """The managed Redis: its Deployment, Service, NetworkPolicy and password Secret."""
    return f"{job}-{REDIS}"


def storage_claim_name(job: str) -> str:
    return f"{job}-storage"


def role_service_name(job: str, role: str) -> str:
    """Headless Service of one worker role; pods are ``<pod>.<service>`` in DNS."""
    return f"{job}-{role}"


def pod_name(job: str, role: str, index: int = 0) -> str:
    return f"{job}-{role}-{index}" if role == GENERATION else f"{job}-{role}"


def desired_pods(job: str, generation_replicas: int) -> dict[str, tuple[str, int]]:
    """Every worker pod the job should have: name -> (role, worker index)."""
    pods = {pod_name(job, COORDINATOR): (COORDINATOR, 0)}
    for index in range(generation_replicas):
        pods[pod_name(job, GENERATION, index)] = (GENERATION, index)
    pods[pod_name(job, INFERENCE)] = (INFERENCE, 0)
    pods[pod_name(job, TRAINER)] = (TRAINER, 0)
    return pods


def labels(job: str, role: str) -> dict[str, str]:
    """Recommended ``app.kubernetes.io/*`` labels plus ours (selectors use only ours)."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/part-of": APP_NAME,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB: job,
        LABEL_ROLE: role,
    }


def selector(job: str, role: str) -> dict[str, str]:
    return {LABEL_JOB: job, LABEL_ROLE: role}


def metadata(owner: Owner, name: str, role: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner.name, role),
        "ownerReferences": [owner.reference()],
    }
