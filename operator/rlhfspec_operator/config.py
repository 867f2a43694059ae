"""Operator-wide settings that handlers read at import time (kopf fixes timer intervals then).

Where it sits: ``main`` fills :data:`CONFIG` from its flags before importing ``handlers``;
without ``main`` (``kopf run -m rlhfspec_operator.handlers``) the environment variables below
apply. Nothing here is per-job: per-job behaviour comes from the RLHFJob spec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


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


CONFIG = OperatorConfig()
