"""Migrations on their way: the planner must not plan twice for the same imbalance.

Where it sits: between the coordinator's load reports and ``plan_migrations``
(``coordinator.reallocate.Reallocator``). Load reports refresh every heartbeat; the planner
ticks more often, and a move takes a step or two to execute (the source aborts the sample and
hands it over; the destination reads it, and for a KV move pulls its snapshot). Until the
destination's report shows a moved sample, the reports still put it at its source, so a
planner reading them as they are would move *more* samples to fix an imbalance it has already
fixed: it overshoots (seen on two real workers: 68 samples moved where 48 balanced them). The
ledger keeps each ordered move and rewrites stale reports to where the samples are going.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .model import Migration, RunningSample, WorkerLoad

TRANSIT_TIMEOUT_SECONDS = 5.0
"""Forget a move this long after ordering it: by then both workers have reported it many times
over (or it finished, or its source died and it was reclaimed)."""


@dataclass(frozen=True)
class InTransit:
    sample: RunningSample
    source: str
    destination: str
    ordered_at: float


class TransitLedger:
    """Moves ordered and not yet seen at their destination (see module docstring)."""

    def __init__(self, timeout_seconds: float = TRANSIT_TIMEOUT_SECONDS) -> None:
        self.timeout_seconds = timeout_seconds
        self.moves: dict[str, InTransit] = {}

    def record(
        self, migrations: Sequence[Migration], loads: Sequence[WorkerLoad], now: float
    ) -> None:
        held = {s.sample_id: s for w in loads for s in w.samples}
        for m in migrations:
            sample = held.get(m.sample_id)
            if sample is not None:
                self.moves[m.sample_id] = InTransit(sample, m.source, m.destination, now)

    def apply(self, loads: Sequence[WorkerLoad], now: float) -> list[WorkerLoad]:
        """The loads as they will be once every move in transit has landed."""
        at = {s.sample_id: w.name for w in loads for s in w.samples}
        for sample_id, move in list(self.moves.items()):
            arrived = at.get(sample_id) == move.destination
            if arrived or now - move.ordered_at > self.timeout_seconds:
                del self.moves[sample_id]
        if not self.moves:
            return list(loads)
        out = []
        for w in loads:
            kept = [s for s in w.samples if s.sample_id not in self.moves]
            incoming = [
                replace(m.sample, last_migrated_at=m.ordered_at)
                for m in self.moves.values()
                if m.destination == w.name
            ]
            slots = max(w.free_slots - len(incoming), 0)
            out.append(WorkerLoad(w.name, tuple(kept + incoming), slots))
        return out
