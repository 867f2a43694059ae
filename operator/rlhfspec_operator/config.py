"""Operator-wide settings that handlers read at import time (kopf fixes timer intervals then).

Where it sits: ``main`` fills :data:`CONFIG` from its flags before importing ``handlers``;
without ``main`` (``kopf run -m rlhfspec_operator.handlers``) the environment variables below
apply. Nothing here is per-job: per-job behaviour comes from the RLHFJob spec. The admission
policy (allowed images, allowed external Redis hosts, who may scrape worker metrics) is the
cluster administrator's, set in the Helm chart's values: a job author cannot widen it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _list_env(name: str) -> list[str]:
    """A comma-separated list (empty items dropped)."""
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def parse_peers(text: str) -> list[dict[str, Any]]:
    """A JSON list of NetworkPolicy peers (``namespaceSelector``/``podSelector``/``ipBlock``)."""
    peers = json.loads(text) if text.strip() else []
    if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
        raise ValueError("expected a JSON list of NetworkPolicy peer objects")
    return peers


def _peers_env(name: str) -> list[dict[str, Any]]:
    return parse_peers(os.environ.get(name, ""))


@dataclass
class OperatorConfig:
    interval: float = field(default_factory=lambda: _float_env("RLHFSPEC_OPERATOR_INTERVAL", 5.0))
    """Seconds between reconcile ticks of a job (pod phases, Redis progress, deadlines)."""
    coordinator_url: str | None = field(
        default_factory=lambda: os.environ.get("RLHFSPEC_OPERATOR_COORDINATOR_URL") or None
    )
    """Reach every managed job's Redis here instead of its in-cluster Service (an operator
    running outside the cluster through ``kubectl port-forward``; the tests)."""
    operator_namespace: str | None = field(
        default_factory=lambda: os.environ.get("POD_NAMESPACE") or None
    )
    """Where the operator runs (downward API); the Redis NetworkPolicy admits its pods."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (``/metrics``); None: no metrics server."""
    allowed_images: list[str] = field(
        default_factory=lambda: _list_env("RLHFSPEC_OPERATOR_ALLOWED_IMAGES")
    )
    """Glob patterns (``fnmatch``) a job's images must match; empty: any image. Creating an
    RLHFJob runs pods with its images, so this is what keeps it from being "any pod"."""
    allowed_redis_hosts: list[str] = field(
        default_factory=lambda: _list_env("RLHFSPEC_OPERATOR_ALLOWED_REDIS_HOSTS")
    )
    """Host glob patterns an external coordinator URL may name; empty: external mode is
    refused (the operator connects there with its own network position and the password)."""
    metrics_from: list[dict[str, Any]] = field(
        default_factory=lambda: _peers_env("RLHFSPEC_OPERATOR_METRICS_FROM")
    )
    """NetworkPolicy peers (Prometheus) admitted to the worker pods' metrics port."""


CONFIG = OperatorConfig()
