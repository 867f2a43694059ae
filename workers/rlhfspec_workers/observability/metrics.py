"""Prometheus metrics of one worker process (coordinator, generation, inference, trainer).

Where it sits: each worker builds one :class:`WorkerMetrics` at start, calls :meth:`serve`
on ``RLHFSPEC_METRICS_PORT`` (the pod port named ``metrics``; the operator's headless role
Services and the chart's ServiceMonitor scrape it), and feeds it from its loop:
``observe_step`` per engine step (generation), ``observe_status`` per heartbeat,
``observe_iteration`` per finished iteration (coordinator), and the event methods
(migrations, reclaimed samples, calibration, strategy table, weight version) where those
happen. vLLM's own ``vllm:spec_decode_*`` counters are re-exported as vLLM counts them
(:class:`VllmSpecDecodeCollector`), not recomputed, so dashboards can cross-check ours.

Every series carries ``job``, ``role`` and ``worker`` labels. The registry is per object,
not prometheus-client's process-wide default (which vLLM fills with its own metrics), so two
workers in one process (local mode, tests) never collide.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from rlhfspec_workers.messages import IterationMetrics, WorkerStatus

log = logging.getLogger(__name__)

WORKER_LABELS = ("job", "role", "worker")
PREFIX = "rlhfspec_"
VLLM_SPEC_PREFIX = "vllm:spec_decode_"
# k is a small integer: one bucket per value up to 8, then coarser (le=0 counts "no draft").
K_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
MIGRATION_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CounterValues = Mapping[str, float | int | Sequence[float | int]]
"""What ``GenerationEngine.counters()`` returns: vLLM name -> total, or totals per position."""


class EngineStep(Protocol):
    """What :meth:`WorkerMetrics.observe_step` reads of one engine step (the generation
    role's ``StepRecord`` has these fields; metrics sit below the roles and do not import
    them)."""

    @property
    def batch_size(self) -> int: ...
    @property
    def num_accepted_tokens(self) -> int: ...
    @property
    def step_seconds(self) -> float: ...
    @property
    def drafter(self) -> str: ...
    @property
    def num_drafts(self) -> int: ...
    @property
    def accepted_per_pos(self) -> tuple[int, ...]: ...
    @property
    def drafted_per_pos(self) -> tuple[int, ...]: ...
    @property
    def next_drafter(self) -> str: ...
    @property
    def next_k(self) -> int: ...


class VllmSpecDecodeCollector(Collector):
    """Re-exports vLLM's spec-decode counters, read at scrape time, with the worker's labels.

    ``counters`` is typically ``engine.counters``: a scalar becomes one counter sample, a list
    one sample per draft position (label ``position``, as vLLM labels its per-position
    counter). Only names starting with ``vllm:spec_decode_`` are exported."""

    def __init__(self, counters: Callable[[], CounterValues], labels: Mapping[str, str]) -> None:
        self.counters = counters
        self.labels = dict(labels)

    def describe(self) -> Iterable[Metric]:
        # Nothing fixed to declare: the names are whatever the engine reports.
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            values = dict(self.counters())
        except Exception:
            # A scrape must not take the worker down, nor hide our own metrics; log instead.
            log.warning("vLLM spec-decode counters unavailable for this scrape", exc_info=True)
            return []
        names, label_values = list(self.labels), list(self.labels.values())
        families: list[Metric] = []
        for name, value in sorted(values.items()):
            if not name.startswith(VLLM_SPEC_PREFIX):
                continue
            base = name.removesuffix("_total")
            help_text = f"vLLM's {base} counter, re-exported by RLHFSpec."
            if isinstance(value, int | float):
                family = CounterMetricFamily(base, help_text, labels=names)
                family.add_metric(label_values, float(value))
            else:
                family = CounterMetricFamily(base, help_text, labels=[*names, "position"])
                for position, count in enumerate(value):
                    family.add_metric([*label_values, str(position)], float(count))
            families.append(family)
        return families


class WorkerMetrics:
    """The ``rlhfspec_*`` metrics of one worker, in a registry of its own."""

    def __init__(self, job: str, role: str, worker: str) -> None:
        self.job, self.role, self.worker = job, role, worker
        self.registry = CollectorRegistry()
        self._label_values = (job, role, worker)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._vllm: VllmSpecDecodeCollector | None = None
        self._drafters_seen: set[str] = set()

        # -- generation: per engine step
        self.generation_tokens = self._counter(
            "generation_tokens", "Tokens generated (per step: sequences stepped + accepted)."
        )
        self.generation_steps = self._counter("generation_steps", "Engine steps run.")
        self.step_seconds = self._histogram(
            "generation_step_seconds", "Wall time of one engine step.", STEP_SECONDS_BUCKETS
        )
        self.running_batch = self._gauge(
            "generation_running_batch_size", "Sequences in the engine's last step."
        )
        self.tokens_per_second = self._gauge(
            "generation_tokens_per_second", "Generation throughput this worker last reported."
        )
        self.mean_accepted_length = self._gauge(
            "spec_mean_accepted_length", "Tokens emitted per sequence per verification step."
        )
        self.chosen_k = self._gauge("spec_k", "Draft tokens per sequence chosen for the next step.")
        self.chosen_drafter = self._gauge(
            "spec_drafter",
            "1 for the drafter chosen for the next step, 0 for the others.",
            ("drafter",),
        )
        self.chosen_k_steps = self._histogram(
            "spec_k_chosen", "Chosen k per engine step, by drafter.", K_BUCKETS, ("drafter",)
        )
        self.drafts = self._counter(
            "spec_drafts", "Drafts verified (one per sequence per step).", ("drafter",)
        )
        self.drafted_per_pos = self._counter(
            "spec_draft_tokens",
            "Draft tokens verified at each draft position.",
            ("drafter", "position"),
        )
        self.accepted_per_pos = self._counter(
            "spec_accepted_tokens",
            "Draft tokens accepted at each draft position.",
            ("drafter", "position"),
        )
        # -- decisions and state
        self.calibration_age = self._gauge(
            "calibration_age_seconds", "Age of the cost model's calibration table."
        )
        self.strategy_table_version = self._gauge(
            "strategy_table_version", "Version of the strategy table in use."
        )
        self.weight_version = self._gauge("weight_version", "Policy weight version in use.")
        # -- events
        self.migrations = self._counter("migrations", "Samples migrated.")
        self.migrated_tokens = self._counter(
            "migrated_tokens", "Tokens moved (recomputed or transferred) by migrations."
        )
        self.migration_seconds = self._histogram(
            "migration_seconds", "Wall time of one migration.", MIGRATION_SECONDS_BUCKETS
        )
        self.samples_reclaimed = self._counter(
            "samples_reclaimed", "Samples re-queued after a worker fault."
        )
        # -- per iteration (the coordinator's IterationMetrics)
        self.iteration = self._gauge("iteration", "Last finished iteration.")
        self.iteration_samples = self._gauge("iteration_samples", "Samples of the last iteration.")
        self.stage_seconds = self._gauge(
            "stage_seconds", "Seconds of each stage in the last iteration.", ("stage",)
        )
        self.stage_seconds_total = self._counter(
            "stage_cumulative_seconds", "Seconds of each stage over all iterations.", ("stage",)
        )
        self.iteration_tokens_per_second = self._gauge(
            "iteration_tokens_per_second", "Generation throughput of the last iteration."
        )
        self.iteration_accepted_length = self._gauge(
            "iteration_mean_accepted_length", "Mean accepted length of the last iteration."
        )
        self.iteration_draft_acceptance = self._gauge(
            "iteration_draft_acceptance",
            "Accepted / drafted tokens of each drafter in the last iteration.",
            ("drafter",),
        )
        self.draft_version = self._gauge(
            "draft_version", "Draft model version that drafted in the last iteration (0: given)."
        )
        self.iteration_migrations = self._gauge(
            "iteration_migrations", "Samples migrated in the last iteration."
        )
        self.iteration_reclaimed = self._gauge(
            "iteration_samples_reclaimed", "Samples reclaimed after faults in the last iteration."
        )
        self.training = {
            field: self._gauge(field, f"{help_text} of the last iteration.")
            for field, help_text in (
                ("reward_mean", "Mean reward"),
                ("reward_std", "Reward standard deviation"),
                ("kl", "Mean KL to the reference policy"),
                ("policy_loss", "Policy loss"),
                ("value_loss", "Value loss"),
                ("entropy", "Policy entropy"),
            )
        }

    # -- construction helpers -------------------------------------------------------------------

    def _counter(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
        return Counter(PREFIX + name, doc, (*WORKER_LABELS, *extra), registry=self.registry)

    def _gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(PREFIX + name, doc, (*WORKER_LABELS, *extra), registry=self.registry)

    def _histogram(
        self, name: str, doc: str, buckets: Sequence[float], extra: tuple[str, ...] = ()
    ) -> Histogram:
        return Histogram(
            PREFIX + name, doc, (*WORKER_LABELS, *extra), buckets=buckets, registry=self.registry
        )

    def _own(self, metric: Counter | Gauge | Histogram, *extra: str) -> Any:
        return metric.labels(*self._label_values, *extra)

    # -- serving ------------------------------------------------------------------------------

    def serve(self, port: int = 0, addr: str = "0.0.0.0") -> int:
        """Serve ``GET /metrics`` from a daemon thread; returns the bound port (0: any free)."""
        if self._server is not None:
            raise RuntimeError(f"already serving on port {self._server.server_port}")
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop the HTTP server (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def render(self) -> bytes:
        """The text exposition of this registry (what ``/metrics`` returns)."""
        return generate_latest(self.registry)

    def reexport_vllm(self, counters: Callable[[], CounterValues]) -> VllmSpecDecodeCollector:
        """Expose vLLM's ``vllm:spec_decode_*`` counters (e.g. ``engine.counters``) at scrape
        time, labelled with this worker's labels. Once per process registry."""
        if self._vllm is not None:
            raise RuntimeError("vLLM counters are already re-exported by this registry")
        labels = dict(zip(WORKER_LABELS, self._label_values, strict=True))
        self._vllm = VllmSpecDecodeCollector(counters, labels)
        self.registry.register(self._vllm)
        return self._vllm

    # -- updates ------------------------------------------------------------------------------

    def observe_step(self, step: EngineStep, tokens: int | None = None) -> None:
        """One engine step. ``tokens``: tokens the step emitted if the caller counted them;
        otherwise one per sequence stepped plus the accepted draft tokens. That estimate is
        exact for decode steps and high where a sample stops inside an accepted draft (vLLM
        drops the tokens past the stop but counts them accepted) or a prefill is chunked:
        ~13% high on the tiny kit with k=3 and short samples."""
        emitted = tokens if tokens is not None else step.batch_size + step.num_accepted_tokens
        self._own(self.generation_tokens).inc(max(emitted, 0))
        self._own(self.generation_steps).inc()
        self._own(self.step_seconds).observe(step.step_seconds)
        self._own(self.running_batch).set(step.batch_size)
        # "Chosen" is the decision made in this step for the next one (next_*); the counts
        # below belong to the drafts verified in this step (drafter/k), as vLLM reports them.
        self._own(self.chosen_k).set(step.next_k)
        self._own(self.chosen_k_steps, step.next_drafter).observe(step.next_k)
        self._drafters_seen.add(step.next_drafter)
        for drafter in self._drafters_seen:
            self._own(self.chosen_drafter, drafter).set(1 if drafter == step.next_drafter else 0)
        if step.num_drafts:
            self._own(self.drafts, step.drafter).inc(step.num_drafts)
            for position, count in enumerate(step.drafted_per_pos):
                self._own(self.drafted_per_pos, step.drafter, str(position)).inc(count)
            for position, count in enumerate(step.accepted_per_pos):
                self._own(self.accepted_per_pos, step.drafter, str(position)).inc(count)

    def observe_status(self, status: WorkerStatus) -> None:
        """A heartbeat's load report (any role): what it knows, the rest unchanged."""
        self._own(self.weight_version).set(status.weight_version)
        if status.strategy_table_version is not None:
            self._own(self.strategy_table_version).set(status.strategy_table_version)
        if status.role == "generation":
            self._own(self.running_batch).set(status.running)
        if status.tokens_per_second is not None:
            self._own(self.tokens_per_second).set(status.tokens_per_second)
        if status.mean_accepted_length is not None:
            self._own(self.mean_accepted_length).set(status.mean_accepted_length)

    def observe_iteration(self, m: IterationMetrics) -> None:
        """One finished iteration. Fields that are None (e.g. value loss under GRPO) leave
        their gauge as it was rather than exporting NaN."""
        self._own(self.iteration).set(m.iteration)
        self._own(self.iteration_samples).set(m.samples)
        for stage, seconds in m.stage_seconds.items():
            self._own(self.stage_seconds, stage).set(seconds)
            self._own(self.stage_seconds_total, stage).inc(max(seconds, 0.0))
        for field, gauge in self.training.items():
            value = getattr(m, field)
            if value is not None:
                self._own(gauge).set(value)
        if m.tokens_per_second is not None:
            self._own(self.iteration_tokens_per_second).set(m.tokens_per_second)
        if m.mean_accepted_length is not None:
            self._own(self.iteration_accepted_length).set(m.mean_accepted_length)
        if m.strategy_table_version is not None:
            self._own(self.strategy_table_version).set(m.strategy_table_version)
        for drafter, rate in m.draft_acceptance.items():
            self._own(self.iteration_draft_acceptance, drafter).set(rate)
        if m.draft_version is not None:
            self._own(self.draft_version).set(m.draft_version)
        self._own(self.iteration_migrations).set(m.migrations)
        self._own(self.iteration_reclaimed).set(m.reclaimed)
        self._own(self.weight_version).set(m.weight_version)

    def set_calibration_age(self, seconds: float) -> None:
        self._own(self.calibration_age).set(seconds)

    def set_strategy_table_version(self, version: int) -> None:
        self._own(self.strategy_table_version).set(version)

    def set_weight_version(self, version: int) -> None:
        self._own(self.weight_version).set(version)

    def observe_migration(self, tokens: int, seconds: float, samples: int = 1) -> None:
        """``samples`` migrated together, moving ``tokens`` in ``seconds`` of wall time."""
        self._own(self.migrations).inc(samples)
        self._own(self.migrated_tokens).inc(tokens)
        self._own(self.migration_seconds).observe(seconds)

    def observe_reclaimed(self, samples: int) -> None:
        self._own(self.samples_reclaimed).inc(samples)
