"""A generation worker's side of the strategy broadcast (coordinator.strategy is the other).

Where it sits: called from the worker's heartbeat. It publishes the engine's calibrated cost
model once (the coordinator needs it to rank strategies), reports speculative counters per
(drafter, k) since the last report as AcceptanceReports, and applies a newer StrategyTable to
the adaptive strategy within one step of reading it (the strategy then starts each batch bucket
from the table's entry and still decides locally for its own batch size). Every engine step
it observes also goes to the adaptive strategy, whose cost table learns from real step times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhfspec_workers.messages import AcceptanceReport, MessageError, StrategyTable

from .adaptive import AdaptiveStrategy
from .draft_strategy import DraftStrategy
from .records import StepRecord

if TYPE_CHECKING:
    from rlhfspec_workers.runtime import Bus

POOLED_ACCEPTANCE_DRAFTS = 64.0
"""Weight (in drafts) given to the coordinator's pooled acceptance when a table arrives."""


class StrategySync:
    def __init__(self, bus: Bus, worker: str, strategy: DraftStrategy) -> None:
        self.bus = bus
        self.worker = worker
        self.adaptive = strategy if isinstance(strategy, AdaptiveStrategy) else None
        self.table_version: int | None = None
        self._pending: dict[tuple[str, int], list[list[int]]] = {}
        """(drafter, k) -> [drafts, drafted_per_pos..., accepted_per_pos...] since last report."""

    def publish_calibration(self) -> None:
        if self.adaptive is None:
            return
        self.bus.put_raw(self.bus.keys.calibration, self.adaptive.selector.cost_model.to_json())

    def observe(self, step: StepRecord) -> None:
        if self.adaptive is not None:
            self.adaptive.observe_step(step)  # what the step cost refines the cost table
        if step.num_drafts == 0 or step.k == 0:
            return
        drafts, drafted, accepted = self._pending.setdefault((step.drafter, step.k), [[0], [], []])
        drafts[0] += step.num_drafts
        for i, n in enumerate(step.drafted_per_pos):
            if i >= len(drafted):
                drafted.append(0)
            drafted[i] += n
        for i, n in enumerate(step.accepted_per_pos):
            if i >= len(accepted):
                accepted.append(0)
            accepted[i] += n

    def flush(self, weight_version: int) -> None:
        """Send what was observed, then pick up a newer table if the coordinator has one."""
        for (drafter, k), (drafts, drafted, accepted) in self._pending.items():
            self.bus.publish(
                self.bus.keys.acceptance,
                AcceptanceReport(
                    worker=self.worker,
                    weight_version=weight_version,
                    drafter=drafter,
                    drafts=drafts[0],
                    drafted_per_pos=drafted[:k],
                    accepted_per_pos=accepted[:k],
                ),
            )
        self._pending = {}
        if self.adaptive is None:
            return
        try:
            table = self.bus.get(self.bus.keys.strategy, StrategyTable)
        except MessageError:
            return  # a coordinator of another version: keep deciding locally
        if table is None:
            return
        # Versions only grow (a Redis counter) and the key holds the latest table, so any
        # version other than ours is newer; a lower one means Redis lost its state and the
        # coordinator's counter started over: its table is still the current one.
        if table.table_version != self.table_version:
            self.adaptive.apply_table(table, acceptance_drafts=POOLED_ACCEPTANCE_DRAFTS)
            self.table_version = table.table_version
            self.bus.metrics.set_strategy_table_version(table.table_version)
