"""Observability: Prometheus metrics of every worker and the run report.

Where it sits: :mod:`.metrics` is imported by the worker loops (``WorkerMetrics``), the
``rlhfspec report`` command lives in :mod:`.report` (imported lazily by the CLI: it pulls in
matplotlib). The operator keeps its own small exporter (``rlhfspec_operator.metrics``) because
the slim operator image carries no worker code.
"""

from rlhfspec_workers.observability.metrics import (
    VllmSpecDecodeCollector,
    WorkerMetrics,
)

__all__ = ["VllmSpecDecodeCollector", "WorkerMetrics"]
