"""Pure builders of the operator's least-privilege RBAC: exactly the verbs the operator uses.

Where it sits: the Helm chart mirrors :func:`rbac_manifests` (a chart test compares them), and
``tests/operator`` checks every request the running operator makes against :data:`RULES`.
Each rule names its user: kopf (watching jobs, its finalizer and annotations, status, events,
the pod index) or ``kube.Kube`` (children). Watching named namespaces gets a Role and
RoleBinding in each; watching all namespaces gets a ClusterRole and ClusterRoleBinding.
"""

from __future__ import annotations

from typing import Any

from rlhfspec_api import API_GROUP
from rlhfspec_api.crd import PLURAL
from rlhfspec_operator.naming import MANAGED_BY, OPERATOR_LABELS

OPERATOR_NAME = MANAGED_BY
DEFAULT_NAMESPACE = "rlhfspec-system"

RULES: list[dict[str, Any]] = [
    # kopf: list+watch the jobs, patch finalizers and its annotations (progress, diff-base);
    # delete: a finished job with ttlSecondsAfterFinished and ttlDeletesJob (ttl).
    {
        "apiGroups": [API_GROUP],
        "resources": [PLURAL],
        "verbs": ["list", "watch", "patch", "delete"],
    },
    # kopf writes the status through the status subresource.
    {"apiGroups": [API_GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    # The pod index (list+watch); worker pods are created, and deleted when failed/suspended.
    # Every child is read (get) before it is created: an object of that name the job does not
    # own is never adopted (kube.Kube.create).
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    # The job's config; patched when a mutable field (replicas, suspend ...) changes. Every
    # child is deleted by name when a finished job's ttlSecondsAfterFinished passes (ttl).
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["get", "create", "patch", "delete"],
    },
    # The managed Redis password and KV key (created once, read back after a restart) and
    # the user's external Redis password Secret (read only when labelled, see admission).
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get", "delete"]},
    {
        "apiGroups": [""],
        "resources": ["services", "persistentvolumeclaims"],
        "verbs": ["get", "create", "delete"],
    },
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "create", "delete"]},
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["get", "create", "delete"],
    },
    # Events on the jobs (kopf posts core/v1 events).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


def peering_rules(clusterwide: bool) -> list[dict[str, Any]]:
    """Only with ``--peering``: kopf's peering objects (the kopf.dev CRDs must exist)."""
    resource = "clusterkopfpeerings" if clusterwide else "kopfpeerings"
    return [
        {
            "apiGroups": ["kopf.dev"],
            "resources": [resource],
            "verbs": ["get", "list", "watch", "patch"],
        }
    ]


def operator_labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": OPERATOR_NAME, **OPERATOR_LABELS}


def service_account(namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": OPERATOR_NAME, "namespace": namespace, "labels": operator_labels()},
        # The operator reads its token through the projected volume of its own Deployment.
        "automountServiceAccountToken": True,
    }


def rbac_manifests(
    watch_namespaces: list[str] | None,
    *,
    operator_namespace: str = DEFAULT_NAMESPACE,
    peering: bool = False,
) -> list[dict[str, Any]]:
    """Role+RoleBinding per watched namespace, or ClusterRole+binding when ``None`` (all)."""
    subject = {"kind": "ServiceAccount", "name": OPERATOR_NAME, "namespace": operator_namespace}
    rbac = "rbac.authorization.k8s.io"
    clusterwide = watch_namespaces is None
    rules = [dict(rule) for rule in RULES] + (peering_rules(clusterwide) if peering else [])
    if clusterwide:
        meta = {"name": OPERATOR_NAME, "labels": operator_labels()}
        return [
            {"apiVersion": f"{rbac}/v1", "kind": "ClusterRole", "metadata": meta, "rules": rules},
            {
                "apiVersion": f"{rbac}/v1",
                "kind": "ClusterRoleBinding",
                "metadata": dict(meta),
                "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": OPERATOR_NAME},
                "subjects": [subject],
            },
        ]
    objects: list[dict[str, Any]] = []
    for namespace in watch_namespaces or []:
        meta = {"name": OPERATOR_NAME, "namespace": namespace, "labels": operator_labels()}
        objects.append(
            {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": meta, "rules": rules}
        )
        objects.append(
            {
                "apiVersion": f"{rbac}/v1",
                "kind": "RoleBinding",
                "metadata": dict(meta),
                "roleRef": {"apiGroup": rbac, "kind": "Role", "name": OPERATOR_NAME},
                "subjects": [subject],
            }
        )
    return objects


def allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    """Whether ``rules`` grant ``verb`` on ``group``/``resource`` (``pods/status`` style)."""
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
        for rule in rules
    )
