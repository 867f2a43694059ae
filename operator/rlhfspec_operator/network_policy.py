"""Pure builder of the job's worker NetworkPolicy: who may open connections to its worker pods.

Where it sits: the create/resume handler creates it with the other children (owned by the
RLHFJob, like the managed Redis NetworkPolicy in ``managed_redis``). Worker pods listen on two
ports and nothing else: metrics (9400, plain HTTP without authentication) and, on generation
pods, the KV snapshot port (9401). With this policy in place only the job's own generation pods
reach the KV port, and only the peers the cluster's administrator names (Prometheus, chart value
``networkPolicy.metricsFrom``) reach the metrics port; every other connection to a worker pod
is dropped by the cluster's network plugin. Egress stays open: workers dial Redis, storage and
model hubs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from rlhfspec_api.manifest import RLHFJob
from rlhfspec_operator.naming import (
    GENERATION,
    KV_PORT,
    LABEL_JOB,
    LABEL_ROLE,
    METRICS_PORT,
    WORKER_ROLES,
    Owner,
    metadata,
    selector,
)

WORKERS = "workers"


def worker_policy_name(job: str) -> str:
    return f"{job}-{WORKERS}"


def worker_network_policy(
    job: RLHFJob, owner: Owner, metrics_from: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """KV port from the job's generation pods only; metrics port from ``metrics_from`` only
    (empty: from no one)."""
    ingress: list[dict[str, Any]] = [
        {
            "from": [{"podSelector": {"matchLabels": selector(job.name, GENERATION)}}],
            "ports": [{"protocol": "TCP", "port": KV_PORT}],
        }
    ]
    if metrics_from:
        ingress.append(
            {
                "from": copy.deepcopy(list(metrics_from)),
                "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(owner, worker_policy_name(job.name), WORKERS),
        "spec": {
            "podSelector": {
                "matchLabels": {LABEL_JOB: job.name},
                "matchExpressions": [
                    {"key": LABEL_ROLE, "operator": "In", "values": list(WORKER_ROLES)}
                ],
            },
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
