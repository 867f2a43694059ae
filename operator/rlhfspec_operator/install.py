"""Pure builder of the operator's own install: ServiceAccount, RBAC and Deployment.

Where it sits: the reference the Helm chart mirrors (and a unit test validates with
``kubernetes-validate``). The Deployment runs ``rlhfspec operator`` non-root on a read-only
root filesystem, with kopf's liveness endpoint as its probe and its namespace from the
downward API (the managed Redis NetworkPolicy admits the operator's pods by it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class OperatorSettings:
    """The operator's flags beyond its scope and peering: the chart's values of the same
    names (``metrics``, ``allowedImages``, ``coordinator.allowedHosts``,
    ``networkPolicy.metricsFrom``, ``logLevel``) set the same flags."""

    metrics_port: int | None = None
    """Serve Prometheus metrics on this container port (named ``metrics``); None: none."""
    allowed_images: tuple[str, ...] = ()
    """Globs a job's images must match; empty: any image."""
    allowed_redis_hosts: tuple[str, ...] = ()
    """Host globs an external coordinator URL may name; empty: external mode is refused."""
    metrics_from: tuple[Mapping[str, Any], ...] = ()
    """NetworkPolicy peers admitted to worker pods' metrics port."""
    log_level: str = "INFO"


def operator_args(
    watch_namespaces: list[str] | None,
    peering: str | None,
    settings: OperatorSettings | None = None,
) -> list[str]:
    settings = settings or OperatorSettings()
    args = ["operator"]
    if watch_namespaces is None:
        args.append("--all-namespaces")
    else:
        for namespace in watch_namespaces:
            args += ["--namespace", namespace]
    args.append(f"--liveness=http://0.0.0.0:{LIVENESS_PORT}/healthz")
    args += [f"--peering={peering}"] if peering else ["--standalone"]
    if settings.metrics_port is not None:
        args.append(f"--metrics-port={settings.metrics_port}")
    args += [f"--allowed-image={pattern}" for pattern in settings.allowed_images]
    args += [f"--allowed-redis-host={pattern}" for pattern in settings.allowed_redis_hosts]
    if settings.metrics_from:
        args.append(f"--metrics-from={json.dumps(list(settings.metrics_from))}")
    if settings.log_level != "INFO":
        args.append(f"--log-level={settings.log_level}")
    return args


def operator_deployment(
    watch_namespaces: list[str] | None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    image: str = DEFAULT_IMAGE,
    peering: str | None = None,
    settings: OperatorSettings | None = None,
) -> dict[str, Any]:
    settings = settings or OperatorSettings()
    labels = operator_labels()
    ports = [{"name": "health", "containerPort": LIVENESS_PORT}]
    if settings.metrics_port is not None:
        ports.append({"name": "metrics", "containerPort": settings.metrics_port})
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
                            "args": operator_args(watch_namespaces, peering, settings),
                            "env": [
                                {
                                    "name": "POD_NAMESPACE",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                                }
                            ],
                            "ports": ports,
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
    settings: OperatorSettings | None = None,
) -> list[dict[str, Any]]:
    """Everything but the CRD (``rlhfspec crd``) and the namespace itself."""
    return [
        service_account(namespace),
        *rbac_manifests(watch_namespaces, operator_namespace=namespace, peering=bool(peering)),
        operator_deployment(
            watch_namespaces, namespace=namespace, image=image, peering=peering, settings=settings
        ),
    ]
