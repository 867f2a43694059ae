"""The RLHFuse-style baseline policy: threshold migration of stragglers.

Where it sits: next to `planner`, with the same inputs and outputs, so the coordinator (as a
configurable fallback) and the simulator can run either. Once a worker's samples fall below a
threshold it hands all of them to as few other workers as possible, fullest first, so that the
freed worker could start the next stage (RLHFuse overlaps stages that way). No length
prediction and no gain test: that is what the planner adds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from .model import Migration, MigrationCost, RunningSample, ThroughputModel, WorkerLoad, speed_of


def threshold_plan(
    loads: Sequence[WorkerLoad],
    cost: ThroughputModel | Mapping[str, ThroughputModel],
    migration_cost: MigrationCost,
    *,
    threshold: int,
    now: float = 0.0,
    cooldown_seconds: float = 30.0,
) -> list[Migration]:
    """RLHFuse-style baseline: a worker whose samples number fewer than `threshold` (but > 0)
    hands them all to the fewest other workers that can hold them, fullest first (they run
    longest anyway; the freed worker could start the next stage). Tail workers pack among
    themselves when nobody else has room. No length prediction, no gain test."""
    if threshold < 1:
        raise ValueError("threshold must be >= 1")
    tail = sorted(
        (w for w in loads if 0 < len(w.samples) < threshold), key=lambda w: (len(w.samples), w.name)
    )
    free = {w.name: w.free_slots for w in loads}
    sources: set[str] = set()
    moves: list[tuple[RunningSample, str, str]] = []
    for src in tail:  # smallest tails first: they are the cheapest to empty
        movable = [
            s
            for s in src.samples
            if s.last_migrated_at is None or now - s.last_migrated_at >= cooldown_seconds
        ]
        receivers = [w for w in loads if w.name != src.name and w.name not in sources]
        receivers.sort(key=lambda w: (w.name in {t.name for t in tail}, -len(w.samples), w.name))
        if not movable or sum(free[w.name] for w in receivers) < len(movable):
            continue  # all or nothing: half-emptying a worker frees nothing
        sources.add(src.name)
        for s in movable:
            dst = next(w for w in receivers if free[w.name] > 0)
            free[dst.name] -= 1
            moves.append((s, src.name, dst.name))
    per_order = Counter((src_name, dst_name) for _, src_name, dst_name in moves)
    plan: list[Migration] = []
    for s, src_name, dst_name in moves:
        speed = speed_of(cost, dst_name)
        mode, seconds = migration_cost.choose(s.context_tokens, speed)
        share = migration_cost.order_seconds / per_order[(src_name, dst_name)]
        busy = migration_cost.engine_seconds(mode, s.context_tokens, speed)
        plan.append(Migration(s.sample_id, src_name, dst_name, mode, seconds + share, 0.0, busy))
    return plan
