"""Strategy broadcast: acceptance pooled over every generation worker -> one strategy table.

Where it sits: ``coordinator.loop`` calls :meth:`StrategyBroadcaster.tick` while generating.
Generation workers report their speculative counters per (drafter, k) as AcceptanceReports;
pooling them gives each drafter's per-position acceptance more evidence than any one worker
has, so the table adapts faster after a weight sync. With the workers' calibrated cost model
(published at ``Keys.calibration``) the pure selector computes the best (drafter, k) per
batch-size bucket; a changed table is published with the next version, and each worker starts
from it for its own batch size (``generation.adaptive.AdaptiveStrategy.apply_table``). Versions
come from a Redis counter (``Keys.strategy_version``), so they keep growing across coordinator
restarts and a restarted coordinator's tables are applied.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from rlhfspec_api.generation import DrafterMethod
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.messages import AcceptanceReport, StrategyEntry, StrategyTable
from rlhfspec_workers.runtime import Bus, StreamCursor
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator, StepStats
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.draft_choice import BatchRange
from rlhfspec_workers.spec_decode.selector import Candidate, batch_buckets, selector_table

TICK_SECONDS = 1.0
READ_BATCH = 10_000
"""Acceptance reports pooled per tick at most (the rest wait for the next tick)."""
MAX_BATCH = 256
DRAFT_MODEL = DrafterMethod.DRAFT_MODEL.value


def table_message(
    version: int, ranges: Sequence[BatchRange], acceptance: Mapping[str, list[float]]
) -> StrategyTable:
    """The selector's batch ranges as the versioned wire message (the one conversion between
    the selector's ``SelectorTable`` and ``messages.StrategyTable``, whose field names are part
    of the wire format)."""
    return StrategyTable(
        table_version=version,
        entries=[
            StrategyEntry(min_batch=r.lo, max_batch=r.hi, drafter=r.drafter, k=r.k) for r in ranges
        ],
        acceptance=dict(acceptance),
    )


class StrategyBroadcaster:
    def __init__(self, spec: RLHFJobSpec, bus: Bus) -> None:
        self.bus = bus
        self.max_k = spec.generation.speculative.max_draft_tokens
        half_life = float(spec.generation.speculative.selector.acceptance_half_life_steps)
        self.half_life_drafts = half_life * 16  # steps x a typical batch: drafts, not steps
        self.estimators: dict[str, AcceptanceEstimator] = {}
        self.reports = StreamCursor(bus.keys.acceptance, AcceptanceReport)
        self.version = 0
        self.last_ranges: tuple[BatchRange, ...] = ()
        self.last_tick = 0.0
        self.cost_model: CostModel | None = None
        self.collapsed: dict[str, float] = {}
        self.draft_version = 0
        """The draft model version the pooled draft_model evidence is about."""
        """Collapsed drafters -> their pooled mean accepted length (the progress carries it
        to the operator, which shows the DrafterCollapsed condition); gone once recovered."""

    def tick(self) -> StrategyTable | None:
        now = time.monotonic()
        if now - self.last_tick < TICK_SECONDS:
            return None
        self.last_tick = now
        self._read_reports()
        if self.cost_model is None:
            raw = self.bus.get_raw(self.bus.keys.calibration)
            if raw is None:
                return None  # not adaptive, or no worker calibrated yet
            self.cost_model = CostModel.from_json(raw.decode())
        if not self.estimators:
            return None
        candidates = [Candidate(name, est) for name, est in sorted(self.estimators.items())]
        table = selector_table(batch_buckets(MAX_BATCH), candidates, self.cost_model, self.max_k)
        if table.ranges == self.last_ranges:
            return None
        # The version comes from a counter in Redis: a restarted coordinator starts at 0 in
        # memory, and workers apply only a version other than the one they hold.
        self.version = self.bus.increment(self.bus.keys.strategy_version)
        self.last_ranges = table.ranges
        message = table_message(
            self.version,
            table.ranges,
            {name: est.rates(self.max_k) for name, est in self.estimators.items()},
        )
        self.bus.put(self.bus.keys.strategy, message)
        self.bus.metrics.set_strategy_table_version(self.version)
        return message

    def draft_published(self, version: int | None) -> None:
        """The trainer published draft ``version`` with its weights (``WeightsPublished``): a
        refreshed draft model is a new drafter as far as acceptance goes, so the pooled
        evidence of the old one, and its collapse, are dropped (the next table lets workers
        try it again)."""
        if version is None or version == self.draft_version:
            return
        self.draft_version = version
        self.estimators.pop(DRAFT_MODEL, None)
        self.collapsed.pop(DRAFT_MODEL, None)
        self.last_ranges = ()

    def _read_reports(self) -> None:
        for _, report in self.bus.read_new(self.reports, count=READ_BATCH):
            self._pool(report)

    def _pool(self, report: AcceptanceReport) -> None:
        if report.drafts == 0:
            return
        est = self.estimators.setdefault(
            report.drafter,
            AcceptanceEstimator(report.drafter, half_life_drafts=self.half_life_drafts),
        )
        k = max((i + 1 for i, n in enumerate(report.drafted_per_pos) if n > 0), default=0)
        est.update(
            StepStats(
                num_drafts=report.drafts,
                num_draft_tokens=sum(report.drafted_per_pos),
                num_accepted_tokens=sum(report.accepted_per_pos),
                accepted_per_pos=tuple(report.accepted_per_pos),
                draft_len=k,
            )
        )
        if not est.collapsed:
            self.collapsed.pop(report.drafter, None)
            return
        if report.drafter not in self.collapsed:
            # A stale drafter after a weight sync falls to ~1.0 accepted length: say it loudly.
            print(
                f"[rlhfspec] WARNING: drafter {report.drafter} collapsed: mean accepted length "
                f"{est.mean_accepted_length:.2f} (policy v{report.weight_version}); the "
                "selector stops using it until it recovers",
                flush=True,
            )
        # The latest pooled mean: the condition's message follows it while it stays collapsed.
        self.collapsed[report.drafter] = est.mean_accepted_length
