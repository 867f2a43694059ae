"""Pure builder of the operator's own install: ServiceAccount, RBAC and Deployment.

Where it sits: the reference the Helm chart mirrors (and a unit test validates with
``kubernetes-validate``). The Deployment runs ``rlhfspec operator`` non-root on a read-only
root filesystem, with kopf's liveness endpoint as its probe and its namespace from the
downward API (the managed Redis NetworkPolicy admits the operator's pods by it).
"""

from __future__ import annotations

from typing import Any

from rlhfspec_operator.rbac import (
    DEFAULT_NAMESPACE,
    OPERATOR_NAME,
    operator_labels,
    rbac_manifests,
    service_account,
)

DEFAULT_IMAGE = "ghcr.io/rlhfspec/operator:0.1.0"
LIVENESS_PORT = 8080


def operator_args(watch_namespaces: list[str] | None, peering: str | None) -> list[str]:
    args = ["operator"]
    if watch_namespaces is None:
        args.append("--all-namespaces")
    else:
        for namespace in watch_namespaces:
            args += ["--namespace", namespace]
    args.append(f"--liveness=http://0.0.0.0:{LIVENESS_PORT}/healthz")
    args += [f"--peering={peering}"] if peering else ["--standalone"]
    return args


def operator_deployment(
    watch_namespaces: list[str] | None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    image: str = DEFAULT_IMAGE,
    peering: str | None = None,
) -> dict[str, Any]:
    labels = operator_labels()
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": OPERATOR_NAME, "namespace": namespace, "labels": labels},
        "spec": {
            # One active operator per scope; more replicas need --peering to take turns.
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": OPERATOR_NAME,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 1000,
                        "runAsGroup": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "operator",
                            "image": image,
                            "command": ["rlhfspec"],
                            "args": operator_args(watch_namespaces, peering),
                            "env": [
                                {
                                    "name": "POD_NAMESPACE",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                                }
                            ],
                            "ports": [{"name": "health", "containerPort": LIVENESS_PORT}],
                            "livenessProbe": {
                                "httpGet": {"path": "/healthz", "port": "health"},
                                "initialDelaySeconds": 10,
                                "periodSeconds": 20,
                            },
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "256Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    # kopf's SSL context may spill client certificates to temp files.
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def operator_manifests(
    watch_namespaces: list[str] | None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    image: str = DEFAULT_IMAGE,
    peering: str | None = None,
) -> list[dict[str, Any]]:
    """Everything but the CRD (``rlhfspec crd``) and the namespace itself."""
    return [
        service_account(namespace),
        *rbac_manifests(watch_namespaces, operator_namespace=namespace, peering=bool(peering)),
        operator_deployment(watch_namespaces, namespace=namespace, image=image, peering=peering),
    ]
