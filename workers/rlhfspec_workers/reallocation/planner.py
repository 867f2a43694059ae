"""The sample-reallocation planner: load reports -> migrations that shorten the stage.

Where it sits: the coordinator calls `plan_migrations` periodically and whenever a generation
worker runs dry, with the latest `WorkerLoad`s, each worker's `ThroughputModel` and the job's
`MigrationCost`; it turns the result into `MigrationOrder`s (`to_orders`) for the sources,
which abort the samples and hand them over (vLLM has no live migration: abort, then resubmit
prompt + generated tokens with max_tokens reduced, or load the shipped KV cache;
docs/cpu-notes.md §2). The simulator calls the same function.

Objective: the generation stage ends when its last worker drains (RLHF generation is offline:
makespan, not latency, matters). The planner predicts every worker's drain time
with batch-size-dependent step times (a `RemainingProfile` per worker: each sample's remaining
length as quantile bands from the `LengthPredictor`, because under a heavy tail a worker's
finish is set by its longest samples), then greedily takes the worker predicted to finish last
and sheds a bundle of its samples (its longest, or the ones sharing batches with its longest)
onto its 1, 2, 4, ... earliest-finishing peers, whichever move most reduces the finish time of
the workers involved with each destination charged its move's cost. A move is made only when
that gain exceeds `cost_weight` x the engine time it burns / the fleet size and a fraction of
the remaining time (predictions are noisy: gains below their noise churn samples for nothing),
and while the stage's overhead budget lasts; a sample migrated recently is left alone. The
loop stops when the last worker cannot be helped: then no move reduces the makespan.

The RLHFuse-style baseline it is compared with lives in `threshold`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..messages import MigrationOrder
from .model import (
    Migration,
    MigrationCost,
    MigrationMode,
    RunningSample,
    ThroughputModel,
    WorkerLoad,
    speed_of,
)
from .predictor import LengthPredictor
from .profile import RemainingProfile
from .threshold import threshold_plan as threshold_plan  # re-export: callers import it here


@dataclass(frozen=True)
class PlannerConfig:
    cost_weight: float = 2.0
    """A move's gain (after its cost has delayed whoever it delays) must exceed cost_weight x
    the engine seconds it burns / the number of workers: one second off the stage frees every
    worker for a second, so fleet time is the common currency; the weight (> 1) keeps the
    spend well below the gain because both are predictions."""
    min_gain_fraction: float = 0.05
    """...and must exceed this fraction of the last worker's predicted remaining time: gains
    smaller than the predictions' noise are not real, and chasing them churns samples."""
    min_gain_seconds: float = 0.0
    """...and this many seconds."""
    overhead_budget: float | None = 0.015
    """Engine time all migrations of a stage may burn, as a fraction of the stage's predicted
    worker-time (workers x (elapsed + predicted remaining)); None: unlimited. The issue's
    target (< 2% of stage time) made a constraint, with room for the prediction's error; the
    planner spends it where gains are largest."""
    cooldown_seconds: float = 30.0
    """A sample migrated less than this long ago is not moved again (no ping-pong)."""
    max_steps: int = 256
    """Greedy steps per call (each moves one bundle, possibly scattered)."""
    candidate_samples: int = 4
    """Longest-remaining samples of the last worker tried alone per move."""
    max_destinations: int = 64
    """Earliest-finishing workers (with a free slot) a bundle may be scattered over."""
    max_bundle: int = 256
    """Largest group of samples moved together in one step of the greedy."""
    tail_cutoff: float = 0.5
    """A worker counts as done when fewer than this many samples are expected to be left."""


Entries = tuple[tuple[int, float, float], ...]


@dataclass
class _Worker:
    name: str
    speed: ThroughputModel
    capacity: int
    running: int
    samples: dict[str, RunningSample]
    entries: dict[str, Entries]
    profile: RemainingProfile
    cutoff: float
    delay: float = 0.0  # migration costs already charged to this worker
    finish: float = 0.0
    movable: list[tuple[float, str]] = field(default_factory=list)  # (mean remaining, id)

    def drain(self, profile: RemainingProfile | None = None) -> float:
        p = self.profile if profile is None else profile
        return self.delay + p.drain_seconds(self.speed, capacity=self.capacity, cutoff=self.cutoff)

    @property
    def free_slots(self) -> int:
        return max(self.capacity - self.running, 0)


def _build(
    loads: Sequence[WorkerLoad],
    cost: ThroughputModel | Mapping[str, ThroughputModel],
    predictor: LengthPredictor,
    now: float,
    config: PlannerConfig,
) -> list[_Worker]:
    names = [w.name for w in loads]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate worker names in {names}")
    workers = []
    # Samples at the same point of the same group share a prediction: build its bins once.
    cache: dict[tuple[tuple[float, ...], tuple[float, ...]], tuple[float, Entries]] = {}
    for load in loads:
        w = _Worker(
            load.name,
            speed_of(cost, load.name),
            max(load.capacity, 1),
            load.running,
            {},
            {},
            RemainingProfile(),
            config.tail_cutoff,
        )
        for s in load.samples:
            if s.sample_id in w.samples:
                raise ValueError(f"sample {s.sample_id!r} reported twice by {load.name}")
            key = predictor.points(s)
            hit = cache.get(key)
            if hit is None:
                entries = RemainingProfile.entries(*key)
                hit = cache[key] = (_mean(entries), entries)
            mean, entries = hit
            w.samples[s.sample_id] = s
            w.entries[s.sample_id] = entries
            w.profile.add(entries)
            if s.last_migrated_at is None or now - s.last_migrated_at >= config.cooldown_seconds:
                w.movable.append((mean, s.sample_id))
        w.movable.sort(reverse=True)
        w.finish = w.drain()
        workers.append(w)
    return workers


@dataclass(frozen=True)
class _Leg:
    """The part of a move that lands on one destination."""

    destination: _Worker
    sample_ids: tuple[str, ...]
    modes: tuple[MigrationMode, ...]
    costs: tuple[float, ...]
    profile: RemainingProfile
    finish: float  # cost included
    busy: float  # engine seconds it burns at the destination

    @property
    def total(self) -> float:
        return sum(self.costs)


@dataclass(frozen=True)
class _Move:
    legs: tuple[_Leg, ...]
    gain: float
    score: float
    source_profile: RemainingProfile
    source_finish: float
    busy: float  # engine seconds it burns


def _bundles(pool: list[tuple[float, str]], config: PlannerConfig) -> list[list[str]]:
    """Samples to try moving (pool: longest predicted first): each of the longest few alone,
    then runs of 2, 4, 8, ... starting at the longest, or right after the 1 or 4 longest.

    Why bundles: off a large batch one sample barely changes the step time, so no single move
    pays for itself while moving a quarter of the batch does (a greedy of single moves would
    stop short of the optimum there). Why runs that skip the longest: when a worker's finish
    is set by its longest sample, moving that sample only moves the problem; moving the
    samples that share its batches lets it run faster where it is."""
    out = [[sid] for _, sid in pool[: config.candidate_samples]]
    for skip in (0, 1, 4):
        m = 2
        while skip + m <= len(pool) and m <= config.max_bundle:
            out.append([sid for _, sid in pool[skip : skip + m]])
            m *= 2
    return out


def _leg(
    src: _Worker,
    dst: _Worker,
    sample_ids: list[str],
    migration_cost: MigrationCost,
) -> _Leg:
    chosen = [
        migration_cost.choose(src.samples[sid].context_tokens, dst.speed) for sid in sample_ids
    ]
    profile = dst.profile.copy()
    for sid in sample_ids:
        profile.add(src.entries[sid])
    costs = tuple(c for _, c in chosen)
    busy = sum(
        migration_cost.engine_seconds(m, src.samples[sid].context_tokens, dst.speed)
        for sid, (m, _) in zip(sample_ids, chosen, strict=True)
    )
    # The cost lands on the destination: a recompute's prefill stalls its engine, a KV copy
    # delays the moved samples; both push its finish out by about the leg's total.
    total = migration_cost.order_seconds + sum(costs)
    return _Leg(
        dst,
        tuple(sample_ids),
        tuple(m for m, _ in chosen),
        costs,
        profile,
        dst.drain(profile) + total,
        busy,
    )


def _deal(bundle: list[str], targets: list[_Worker]) -> list[list[str]] | None:
    """Longest first, round-robin over the targets (earliest-finishing first), within their
    free slots; None when they cannot take the bundle or some target would get nothing."""
    shares: list[list[str]] = [[] for _ in targets]
    room = [t.free_slots for t in targets]
    i = 0
    for sid in bundle:
        for _ in range(len(targets)):
            if room[i] > 0:
                break
            i = (i + 1) % len(targets)
        else:
            return None
        shares[i].append(sid)
        room[i] -= 1
        i = (i + 1) % len(targets)
    return shares if all(shares) else None


def _best_move(
    src: _Worker,
    others: list[_Worker],
    migration_cost: MigrationCost,
    config: PlannerConfig,
    fleet: int,
    budget: float,
) -> _Move | None:
    """The best way to shed a bundle of src's longest samples onto its k earliest-finishing
    peers (k = 1, 2, 4, ...): scattering a long tail over many idle workers is one move, whose
    cost is shared by the fleet, not a series of one-destination moves none of which pays."""
    dests = sorted((w for w in others if w.free_slots > 0), key=lambda w: w.finish)
    dests = dests[: config.max_destinations]
    floor = max(config.min_gain_seconds, config.min_gain_fraction * src.finish)
    best: _Move | None = None
    for bundle in _bundles(src.movable, config) if dests else []:
        src_profile = src.profile.copy()
        for sid in bundle:
            src_profile.add(src.entries[sid], sign=-1.0)
        src_finish = src.drain(src_profile)
        if src.finish - src_finish <= floor:
            continue  # even a free, instant move of this bundle would not pay
        k, last_gain = 1, -math.inf
        while k <= min(len(dests), len(bundle)):
            shares = _deal(bundle, dests[:k])
            k *= 2
            if shares is None:
                continue
            legs = tuple(
                _leg(src, dst, share, migration_cost)
                for dst, share in zip(dests, shares, strict=False)
            )
            busy = sum(leg.busy for leg in legs)
            if busy > budget:
                continue
            gain = src.finish - max(src_finish, *(leg.finish for leg in legs))
            if gain < last_gain:
                break  # spreading wider stopped helping (the gain is unimodal in k)
            last_gain = gain
            # Engine time burnt anywhere is worth 1/fleet of a second of everyone's stage.
            charge = config.cost_weight * busy / fleet
            if gain <= max(charge, floor):
                continue
            score = gain - charge
            if best is None or score > best.score:
                best = _Move(legs, gain, score, src_profile, src_finish, busy)
    return best


def plan_migrations(
    loads: Sequence[WorkerLoad],
    cost: ThroughputModel | Mapping[str, ThroughputModel],
    migration_cost: MigrationCost,
    *,
    now: float = 0.0,
    predictor: LengthPredictor | None = None,
    config: PlannerConfig | None = None,
    spent_seconds: float = 0.0,
    elapsed_seconds: float = 0.0,
) -> list[Migration]:
    """Migrations that minimise the predicted makespan of the generation stage.

    `cost`: one ThroughputModel for homogeneous workers, or one per worker name. Samples
    without `predicted_remaining` are predicted by `predictor` (default: an empty one, i.e.
    the prior). A move is made only when it shortens the predicted finish of the last worker
    (its own cost charged where it lands) by more than `min_gain_fraction` of that finish and
    by more than `cost_weight` x the engine time it burns / the number of workers, and while
    the stage's `overhead_budget` lasts (`spent_seconds`: engine time this stage's earlier
    migrations burnt; `elapsed_seconds`: how long the stage has run). `now` is only the clock
    that `last_migrated_at` is read against (cooldown). Each sample moves at most once per call
    (a later step only re-targets it).
    """
    cfg = config or PlannerConfig()
    workers = _build(loads, cost, predictor or LengthPredictor(), now, cfg)
    origin: dict[str, str] = {}  # sample id -> the worker that holds it now (for real)
    planned: dict[str, Migration] = {}
    budget = math.inf
    if cfg.overhead_budget is not None and workers:
        stage = elapsed_seconds + max(w.finish for w in workers)
        budget = cfg.overhead_budget * len(workers) * stage - spent_seconds
    steps = 0
    while len(workers) > 1 and steps < cfg.max_steps:
        steps += 1
        src = max(workers, key=lambda w: w.finish)
        others = [w for w in workers if w is not src]
        move = _best_move(src, others, migration_cost, cfg, len(workers), budget)
        if move is None:
            break  # the last worker cannot be helped: no move shortens the stage
        budget -= move.busy
        moved = {sid for leg in move.legs for sid in leg.sample_ids}
        src.movable = [e for e in src.movable if e[1] not in moved]
        src.profile, src.finish = move.source_profile, move.source_finish
        # A planned arrival holds a slot where it was sent, whatever it did at home.
        src.running -= sum(1 for sid in moved if src.samples[sid].running or sid in origin)
        for leg in move.legs:
            dst = leg.destination
            dst.profile, dst.finish = leg.profile, leg.finish
            dst.running += len(leg.sample_ids)
            dst.delay += migration_cost.order_seconds + leg.total
            share_of_order = migration_cost.order_seconds / len(leg.sample_ids)
            for sid, mode, seconds in zip(leg.sample_ids, leg.modes, leg.costs, strict=True):
                sample = src.samples[sid]
                dst.samples[sid] = sample
                dst.entries[sid] = src.entries[sid]
                # A sample planned in this call stays movable: moving it on only re-targets
                # the planned order (it has not left its worker yet), so a later step can
                # correct an earlier greedy one without migrating anything twice.
                dst.movable.append((_mean(src.entries[sid]), sid))
                home = origin.setdefault(sid, src.name)
                planned.pop(sid, None)
                if home == dst.name:
                    continue
                busy = migration_cost.engine_seconds(mode, sample.context_tokens, dst.speed)
                gain_share = move.gain / len(moved)
                planned[sid] = Migration(
                    sid, home, dst.name, mode, seconds + share_of_order, gain_share, busy
                )
            dst.movable.sort(reverse=True)
    return list(planned.values())


def _mean(entries: Entries) -> float:
    return sum(m for _, _, m in entries)


def predicted_makespan(
    loads: Sequence[WorkerLoad],
    cost: ThroughputModel | Mapping[str, ThroughputModel],
    *,
    predictor: LengthPredictor | None = None,
    config: PlannerConfig | None = None,
) -> float:
    """The predicted stage completion time of these loads if nothing moves."""
    cfg = config or PlannerConfig()
    workers = _build(loads, cost, predictor or LengthPredictor(), 0.0, cfg)
    return max((w.finish for w in workers), default=0.0)


def to_orders(migrations: Sequence[Migration], *, order_prefix: str) -> list[MigrationOrder]:
    """One MigrationOrder per (source, destination, mode), sample ids in plan order."""
    grouped: dict[tuple[str, str, str], list[Migration]] = {}
    for m in migrations:
        grouped.setdefault((m.source, m.destination, m.mode), []).append(m)
    orders = []
    for i, ((source, destination, _), ms) in enumerate(grouped.items()):
        orders.append(
            MigrationOrder(
                order_id=f"{order_prefix}-{i}",
                source=source,
                destination=destination,
                sample_ids=[m.sample_id for m in ms],
                mode=ms[0].mode,
                predicted_gain_seconds=sum(m.predicted_gain_seconds for m in ms),
            )
        )
    return orders
