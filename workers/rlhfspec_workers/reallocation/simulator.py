"""Discrete-event simulator of the generation stage across many workers, for policy replays.

Where it sits: next to the planner, used by the reallocation benchmark. This machine cannot
host 8-64 engines, so the benchmark replays the same policies (static partition, RLHFuse-style
threshold migration, our planner) on a model of them: each worker is the planner's fluid
`ThroughputModel` (a real run's measured step-time table or a calibrated `CostModel` plugs in
through it) and each sample has its true response length (synthetic here, or a real run's).
The policies see only what a coordinator would: tokens generated so far and a
`LengthPredictor` that learns from finished samples, never the true lengths.

Events: a sample finishes (its worker's virtual token clock reaches it), a migrated sample
arrives, the planner's periodic tick, or a worker running dry (which also triggers a plan).
Between events every worker runs a constant batch B, advancing each running sample by
tokens_per_step(B) per step_seconds(B). A sample's first admission stalls its worker for the
prefill of its prompt (a real engine computes every prompt before it decodes it; on a CPU that
costs about as much per token as decoding, and 144 short prompts delay the first token by
~1 s). A migration removes the sample at the source with its whole tokens so far (fractional
progress of the last step is lost, as with a real abort), stalls the destination for the
recompute prefill (a KV copy does not), and delivers the sample after the migration's cost;
the destination resumes it with the remaining tokens only.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .model import MigrationCost, RunningSample, ThroughputModel, WorkerLoad
from .planner import PlannerConfig, plan_migrations, predicted_makespan
from .predictor import LengthPredictor
from .threshold import threshold_plan
from .workload import SimSample

Policy = Literal["static", "threshold", "planner"]
_EPS = 1e-6


@dataclass(frozen=True)
class SimConfig:
    policy: Policy = "planner"
    capacity: int | None = None
    """Running slots per worker; None: the largest initial share (engine sized for it)."""
    plan_interval_seconds: float | None = None
    """None: plan_interval_fraction of the predicted static makespan."""
    plan_interval_fraction: float = 0.05
    plan_on_idle: bool = True
    threshold: int = 4
    cooldown_seconds: float | None = None
    """None: 5 plan intervals."""
    migration_cost: MigrationCost = field(default_factory=MigrationCost)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    max_tokens: int | None = None


@dataclass
class SimResult:
    policy: str
    workers: int
    makespan_seconds: float
    worker_finish_seconds: list[float]
    migrations: int
    overhead_seconds: float
    """Engine time migrations consumed (hand-over work, recompute prefill, KV block set-up)."""
    overhead_fraction: float
    """overhead_seconds / (workers x makespan): the share of the stage's worker-time."""
    max_worker_overhead_fraction: float
    """The most engine time any one destination spent on migrations, relative to the makespan."""
    migration_delay_seconds: float
    """Sum over moved samples of the time they did not decode (order round trip included)."""
    idle_worker_seconds: float
    """Worker-time with nothing to run before the stage ended (what RLHFuse reuses)."""
    prefill_seconds: float
    """Engine time spent computing prompts at their first admission (every policy pays it)."""
    tokens: int
    plan_calls: int
    plan_wall_seconds: float
    batch_trace: list[tuple[float, int, int]]
    """(t, worker index, running batch) at every change."""
    finished_at: dict[str, float]
    segments: dict[str, list[tuple[str, int]]]
    """sample id -> [(worker, tokens generated there)] in order."""

    def to_dict(self, *, trace: bool = True, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not trace:
            d.pop("batch_trace")
        if not samples:
            d.pop("finished_at")
            d.pop("segments")
        return d


@dataclass
class _Sample:
    spec: SimSample
    done: int = 0
    v_start: float = 0.0
    v_finish: float = 0.0
    last_migrated_at: float | None = None
    prefilled: bool = False
    """Its prompt was computed by some engine (a migration then pays its own way in)."""
    segments: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class _Worker:
    name: str
    speed: ThroughputModel
    capacity: int
    clock: float = 0.0
    running: dict[str, _Sample] = field(default_factory=dict)
    heap: list[tuple[float, str]] = field(default_factory=list)
    waiting: deque[_Sample] = field(default_factory=deque)
    stalled_until: float = 0.0
    incoming: int = 0
    overhead: float = 0.0
    prefill: float = 0.0
    busy_until: float = 0.0

    def admit(self, s: _Sample, now: float) -> None:
        if not s.prefilled:
            seconds = self.speed.prefill_seconds(s.spec.prompt_tokens)
            self.stalled_until = max(self.stalled_until, now) + seconds
            self.prefill += seconds
            s.prefilled = True
        s.v_start = self.clock
        s.v_finish = self.clock + (s.spec.length - s.done)
        self.running[s.spec.sample_id] = s
        heapq.heappush(self.heap, (s.v_finish, s.spec.sample_id))

    def fill(self, now: float) -> None:
        while self.waiting and len(self.running) < self.capacity:
            self.admit(self.waiting.popleft(), now)

    def _head(self) -> float | None:
        while self.heap:
            v, sid = self.heap[0]
            s = self.running.get(sid)
            if s is not None and s.v_finish == v:
                return v
            heapq.heappop(self.heap)  # removed by a migration
        return None

    def next_finish(self, t: float) -> float:
        v = self._head()
        if v is None:
            return math.inf
        start = max(t, self.stalled_until)
        return start + max(v - self.clock, 0.0) * self.speed.seconds_per_token(len(self.running))

    def advance(self, t0: float, t1: float) -> float:
        """Run from t0 to t1; returns idle seconds in between."""
        if not self.running:
            return 0.0 if (self.waiting or self.incoming) else t1 - t0
        dt = t1 - max(t0, self.stalled_until)
        if dt > 0:
            self.clock += dt / self.speed.seconds_per_token(len(self.running))
        return 0.0

    def pop_finished(self) -> list[_Sample]:
        out = []
        while (v := self._head()) is not None and v <= self.clock + _EPS:
            _, sid = heapq.heappop(self.heap)
            s = self.running.pop(sid)
            s.segments.append((self.name, s.spec.length - s.done))
            s.done = s.spec.length
            out.append(s)
        return out

    def generated_here(self, s: _Sample) -> int:
        remaining = s.spec.length - s.done
        return min(int(self.clock - s.v_start + _EPS), remaining - 1)

    def remove(self, sid: str) -> _Sample | None:
        s = self.running.pop(sid, None)
        if s is not None:
            here = self.generated_here(s)
            s.segments.append((self.name, here))
            s.done += here
            return s
        for w in self.waiting:
            if w.spec.sample_id == sid:
                self.waiting.remove(w)
                return w
        return None

    def load(self) -> WorkerLoad:
        samples = [
            RunningSample(
                sid,
                s.done + self.generated_here(s),
                prompt_tokens=s.spec.prompt_tokens,
                group_id=s.spec.group_id,
                last_migrated_at=s.last_migrated_at,
            )
            for sid, s in self.running.items()
        ]
        samples += [
            RunningSample(
                s.spec.sample_id,
                s.done,
                prompt_tokens=s.spec.prompt_tokens,
                group_id=s.spec.group_id,
                running=False,
                last_migrated_at=s.last_migrated_at,
            )
            for s in self.waiting
        ]
        free = 0 if self.waiting else max(self.capacity - len(self.running) - self.incoming, 0)
        return WorkerLoad(self.name, tuple(samples), free)

    @property
    def empty(self) -> bool:
        return not self.running and not self.waiting and not self.incoming


def simulate(
    partition: Sequence[Sequence[SimSample]],
    speeds: ThroughputModel | Sequence[ThroughputModel],
    config: SimConfig | None = None,
    *,
    predictor: LengthPredictor | None = None,
    names: Sequence[str] | None = None,
) -> SimResult:
    """Replay one policy over an initial assignment (partition[i] = worker i's samples).

    `predictor` is mutated (it observes finishes); pass a fresh one per run.
    """
    cfg = config or SimConfig()
    n = len(partition)
    if n < 1:
        raise ValueError("need at least one worker")
    speed_list = [speeds] * n if isinstance(speeds, ThroughputModel) else list(speeds)
    if len(speed_list) != n:
        raise ValueError(f"{len(speed_list)} throughput models for {n} workers")
    worker_names = list(names) if names is not None else [f"w{i}" for i in range(n)]
    cap = cfg.capacity or max(1, max(len(p) for p in partition))
    pred = predictor or LengthPredictor(max_tokens=cfg.max_tokens)
    workers = [_Worker(worker_names[i], speed_list[i], cap) for i in range(n)]
    index = {w.name: i for i, w in enumerate(workers)}
    every = [s for p in partition for s in p]
    if len({s.sample_id for s in every}) != len(every):
        raise ValueError("sample ids must be unique")
    for w, part in zip(workers, partition, strict=True):
        w.waiting.extend(_Sample(s) for s in part)
        w.fill(0.0)

    interval = cfg.plan_interval_seconds
    if interval is None:
        initial = predicted_makespan(
            [w.load() for w in workers], _speed_map(workers), predictor=pred
        )
        interval = max(cfg.plan_interval_fraction * initial, 1e-3)
    cooldown = cfg.cooldown_seconds if cfg.cooldown_seconds is not None else 5 * interval
    planner_cfg = PlannerConfig(**{**asdict(cfg.planner), "cooldown_seconds": cooldown})

    t = 0.0
    arrivals: list[tuple[float, int, int, _Sample]] = []
    seq = 0
    next_plan = interval if cfg.policy != "static" else math.inf
    trace: list[tuple[float, int, int]] = [(0.0, i, len(w.running)) for i, w in enumerate(workers)]
    last_batch = [len(w.running) for w in workers]
    finished_at: dict[str, float] = {}
    segments: dict[str, list[tuple[str, int]]] = {}
    migrations, overhead, delay, idle, plan_calls, plan_wall = 0, 0.0, 0.0, 0.0, 0, 0.0

    def record() -> None:
        for i, w in enumerate(workers):
            if len(w.running) != last_batch[i]:
                last_batch[i] = len(w.running)
                trace.append((t, i, last_batch[i]))

    while arrivals or any(w.running or w.waiting for w in workers):
        t_next = min(min(w.next_finish(t) for w in workers), next_plan)
        if arrivals:
            t_next = min(t_next, arrivals[0][0])
        if not math.isfinite(t_next):
            raise RuntimeError("simulation stalled: samples waiting but nothing can run")
        for w in workers:
            idle += w.advance(t, t_next)
        t = t_next
        went_idle = False
        for w in workers:
            for s in w.pop_finished():
                finished_at[s.spec.sample_id] = t
                segments[s.spec.sample_id] = s.segments
                pred.observe(s.spec.length, s.spec.group_id)
                w.busy_until = t
            w.fill(t)
            went_idle = went_idle or (w.empty and w.busy_until == t)
        while arrivals and arrivals[0][0] <= t:
            _, _, i, s = heapq.heappop(arrivals)
            workers[i].incoming -= 1
            workers[i].waiting.append(s)
            workers[i].fill(t)
        record()
        due = t >= next_plan or (cfg.plan_on_idle and went_idle)
        if cfg.policy == "static" or not due:
            continue
        next_plan = t + interval
        started = time.perf_counter()
        loads = [w.load() for w in workers]
        if cfg.policy == "planner":
            plan = plan_migrations(
                loads,
                _speed_map(workers),
                cfg.migration_cost,
                now=t,
                predictor=pred,
                config=planner_cfg,
                spent_seconds=overhead,
                elapsed_seconds=t,
            )
        else:
            plan = threshold_plan(
                loads,
                _speed_map(workers),
                cfg.migration_cost,
                threshold=cfg.threshold,
                now=t,
                cooldown_seconds=cooldown,
            )
        plan_wall += time.perf_counter() - started
        plan_calls += 1
        for m in plan:
            src, dst = workers[index[m.source]], workers[index[m.destination]]
            moved = src.remove(m.sample_id)
            if moved is None:
                continue
            src.fill(t)
            moved.prefilled = True  # the move's cost below covers its way into the destination
            moved.last_migrated_at = t
            dst.incoming += 1
            dst.stalled_until = max(dst.stalled_until, t) + m.destination_busy_seconds
            dst.overhead += m.destination_busy_seconds
            overhead += m.destination_busy_seconds
            delay += m.cost_seconds
            migrations += 1
            seq += 1
            heapq.heappush(arrivals, (t + m.cost_seconds, seq, index[dst.name], moved))
        record()

    makespan = t
    return SimResult(
        policy=cfg.policy,
        workers=n,
        makespan_seconds=makespan,
        worker_finish_seconds=[w.busy_until for w in workers],
        migrations=migrations,
        overhead_seconds=overhead,
        overhead_fraction=overhead / (n * makespan) if makespan > 0 else 0.0,
        max_worker_overhead_fraction=(
            max(w.overhead for w in workers) / makespan if makespan > 0 else 0.0
        ),
        migration_delay_seconds=delay,
        idle_worker_seconds=idle,
        prefill_seconds=sum(w.prefill for w in workers),
        tokens=sum(s.length for s in every),
        plan_calls=plan_calls,
        plan_wall_seconds=plan_wall,
        batch_trace=trace,
        finished_at=finished_at,
        segments=segments,
    )


def _speed_map(workers: Sequence[_Worker]) -> dict[str, ThroughputModel]:
    return {w.name: w.speed for w in workers}
