"""The coordinator's reallocation loop: load reports in, migration orders out.

Where it sits: ``coordinator.loop`` calls :meth:`Reallocator.tick` every
``generation.reallocation.intervalSeconds`` while an iteration is generating (with two or
more generation workers). It reads every worker's :class:`LoadReport`, feeds finished lengths
to the length predictor, builds each worker's throughput model from the steps it measured,
asks the pure planner (``reallocation.planner``) for the migrations that shorten the predicted
stage time by more than they cost, and sends each source its :class:`MigrationOrder`.

The workers it plans over are the generation workers with a heartbeat, read every tick, not a
list fixed when the coordinator started: ``kubectl scale`` (``spec.generation.replicas``)
adds or deletes generation pods while the job runs. A new worker is planned over from its
first load report; a deleted one drops out when its report goes stale (and its unacked
samples are reclaimed by the others after the task lease, see ``generation.handover``).
"""

from __future__ import annotations

import statistics
import time
from typing import Literal

from rlhfspec_api.generation import MigrationMethod
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.messages import LoadReport
from rlhfspec_workers.reallocation.model import (
    MigrationCost,
    ModePolicy,
    RunningSample,
    ThroughputModel,
    WorkerLoad,
)
from rlhfspec_workers.reallocation.planner import (
    PlannerConfig,
    plan_migrations,
    threshold_plan,
    to_orders,
)
from rlhfspec_workers.reallocation.predictor import LengthPredictor
from rlhfspec_workers.reallocation.transit import TransitLedger
from rlhfspec_workers.runtime import Bus

STALE_REPORT_SECONDS = 5.0
MIN_PROFILE_ROWS = 1
KV_PRIOR_BYTES_PER_SECOND = 100e6
"""KV hand-over rate assumed until a worker has measured one (export and encode at the source,
decode at the destination; a few hundred MB/s on the 2-core CPU here: the prior errs slow)."""
KV_FIXED_SECONDS = 0.002
"""Per KV-migrated sample on top of its bytes: the destination's block copy into vLLM's cache
(the snapshot's decode is in the measured rate)."""


class Reallocator:
    def __init__(
        self,
        spec: RLHFJobSpec,
        bus: Bus,
        replicas: int,
        *,
        policy: Literal["planner", "threshold", "none"] | None = None,
        threshold: int = 8,
    ) -> None:
        """``policy``: the planner (ours; the default when reallocation is enabled), an
        RLHFuse-style threshold migration, or none (static partition), for benchmarks."""
        self.spec = spec
        self.bus = bus
        self.names = [f"generation-{i}" for i in range(replicas)]
        """The workers the job started with: read until the first heartbeats are in."""
        realloc = spec.generation.reallocation
        self.policy = policy or ("planner" if realloc.enabled else "none")
        self.threshold = threshold
        # Not `replicas > 1`: a job started with one replica may be scaled up while it runs
        # (the planner needs two live reports and plans nothing with fewer).
        self.enabled = self.policy != "none"
        self.interval = realloc.interval_seconds
        max_new = spec.generation.max_new_tokens
        self.predictor = LengthPredictor(prior_mean=max(max_new / 4, 1.0), max_tokens=max_new)
        self.mode: ModePolicy = {  # type: ignore[assignment]
            MigrationMethod.RECOMPUTE: "recompute",
            MigrationMethod.KV: "kv_transfer",
            MigrationMethod.AUTO: "auto",
        }[realloc.migration]
        # Until the workers report a KV path (kv_migration.py), every move recomputes.
        self.migration_cost = MigrationCost(mode=self.mode)
        self.config = PlannerConfig(min_gain_seconds=realloc.min_gain_seconds)
        self.last_tick = 0.0
        self._seen: dict[str, float] = {}
        self.issued = 0
        self.rounds = 0
        self.stage: tuple[int, float] | None = None
        """(iteration, when its generation started): the planner's overhead budget is per stage."""
        self.spent_seconds = 0.0
        """Engine seconds the migrations ordered this stage cost their destinations."""
        self.recompute_seconds = 0.0
        """The part of ``spent_seconds`` that re-prefills contexts (recompute moves), as the
        planner priced them (at the workers' measured prefill rate once they report one)."""
        self.transit = TransitLedger()

    def tick(self, iteration: int) -> int:
        """Plan once if the interval has passed; returns migrations ordered now."""
        now = time.monotonic()
        if not self.enabled or now - self.last_tick < self.interval:
            return 0
        self.last_tick = now
        if self.stage is None or self.stage[0] != iteration:
            self.stage = (iteration, now)
            self.spent_seconds = 0.0
            self.recompute_seconds = 0.0
            self.transit = TransitLedger()
        reports = self._reports()
        live = [r for r in reports if r.iteration == iteration or not r.samples]
        if len(live) < 2:
            return 0
        self.migration_cost = migration_cost(self.mode, live)
        # Every replica serves the same model on the same kind of hardware: one table from all
        # their steps covers more batch sizes than any one worker has run (a worker that only
        # ran small batches would otherwise look fast at large ones and attract too much).
        speed = _speed(live)
        if speed is None:
            return 0  # a worker without measured steps yet: nothing to plan with
        speeds = {report.worker: speed for report in live}
        loads = []
        for report in live:
            loads.append(
                WorkerLoad(
                    name=report.worker,
                    samples=tuple(
                        RunningSample(
                            sample_id=s.sample_id,
                            generated_tokens=s.generated,
                            prompt_tokens=s.prompt_tokens,
                            group_id=s.group_id,
                            running=s.running,
                            max_tokens=s.max_tokens,
                            last_migrated_at=None if s.migrations == 0 else now,
                        )
                        for s in report.samples
                    ),
                    free_slots=report.free_slots,
                )
            )
        # Reports lag the orders: plan on where the samples already ordered are going.
        loads = self.transit.apply(loads, now)
        if self.policy == "threshold":
            migrations = threshold_plan(
                loads, speeds, self.migration_cost, threshold=self.threshold, now=now
            )
        else:
            migrations = plan_migrations(
                loads,
                speeds,
                self.migration_cost,
                now=now,
                predictor=self.predictor,
                config=self.config,
                spent_seconds=self.spent_seconds,
                elapsed_seconds=now - self.stage[1],
            )
        if not migrations:
            return 0
        self.transit.record(migrations, loads, now)
        self.rounds += 1
        for order in to_orders(migrations, order_prefix=f"it{iteration}-r{self.rounds}"):
            self.bus.publish(self.bus.keys.migrations_for(order.source), order)
        self.issued += len(migrations)
        self.spent_seconds += sum(m.destination_busy_seconds for m in migrations)
        self.recompute_seconds += sum(
            m.destination_busy_seconds for m in migrations if m.mode == "recompute"
        )
        return len(migrations)

    def worker_names(self) -> list[str]:
        """Generation workers to plan over: those with a heartbeat that are not stopping (a
        scaled job's set changes while it runs), else the ones the job started with."""
        live = {
            name
            for name, status in self.bus.workers().items()
            if status.role == "generation" and status.state != "stopping"
        }
        return sorted(live) if live else list(self.names)

    def _reports(self) -> list[LoadReport]:
        reports = []
        for report in self.bus.latest_loads(self.worker_names()):
            if self._seen.get(report.worker) != report.updated_at:  # each report once
                self._seen[report.worker] = report.updated_at
                for length in report.finished_lengths:
                    self.predictor.observe(length)
            if time.time() - report.updated_at < STALE_REPORT_SECONDS:
                reports.append(report)
        return reports


def _step_rows(report: LoadReport) -> list[tuple[int, float, float]]:
    """(batch size, seconds per step, tokens per sequence per step) rows a report measured."""
    return [(int(b), s, t) for b, s, t in report.step_profile if b >= 1 and s > 0]


def _speed(reports: list[LoadReport]) -> ThroughputModel | None:
    """The step table of these workers' recent steps: by batch size, the median over them;
    None while any of them has not measured a step yet."""
    by_batch: dict[int, list[tuple[float, float]]] = {}
    for report in reports:
        rows = _step_rows(report)
        if len(rows) < MIN_PROFILE_ROWS:
            return None
        for b, s, t in rows:
            by_batch.setdefault(b, []).append((s, t))
    rows = [
        (b, statistics.median(s for s, _ in v), statistics.median(t for _, t in v))
        for b, v in sorted(by_batch.items())
    ]
    measured = [r.prefill_seconds_per_token for r in reports if r.prefill_seconds_per_token]
    per_token = statistics.median(measured) if measured else None  # None: from the table
    return ThroughputModel.from_table(rows, prefill_seconds_per_token=per_token)


def migration_cost(mode: ModePolicy, reports: list[LoadReport]) -> MigrationCost:
    """The cost model of a move between these workers: KV transfer is on offer only when every
    one of them has the KV path; its rate is the slowest measured (or the prior)."""
    per_token = [r.kv_bytes_per_token for r in reports]
    if mode == "recompute" or not per_token or min(per_token) <= 0.0:
        return MigrationCost(mode=mode)
    rates = [r.kv_bytes_per_second for r in reports if r.kv_bytes_per_second]
    return MigrationCost(
        mode=mode,
        kv_bytes_per_token=max(per_token),
        kv_bandwidth_bytes_per_second=min(rates) if rates else KV_PRIOR_BYTES_PER_SECOND,
        kv_fixed_seconds=KV_FIXED_SECONDS,
    )
