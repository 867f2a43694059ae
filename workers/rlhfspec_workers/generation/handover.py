"""How a generation worker gives samples away and takes them over: migration and recovery.

Where it sits: inside the generation worker's loop (``worker.GenerationWorker``), between the
engine and Redis. It moves samples through the worker's ``SampleTable`` (preempted out,
queued in) and is given the few collaborators it needs, never the worker itself. Every
heartbeat it publishes a :class:`LoadReport` (what it holds, how far each sample got) for the
coordinator's reallocation planner; it executes the planner's :class:`MigrationOrder`s
addressed to it (abort the sample in vLLM, hand its tokens and log-probs to the destination's
direct stream with ``max_tokens`` reduced, then ack the original task; a ``kv_transfer`` order
also puts the sample's KV cache blocks in this worker's outbox for the destination to pull
and load instead of re-prefilling, see ``kv_migration``, ``kv_outbox`` and ``kv_pull``); it
renews the lease on everything it holds; and it reclaims tasks of workers that stopped
renewing theirs (a dead worker's samples finish elsewhere, each exactly once: XAUTOCLAIM
moves ownership, the done set filters duplicates).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import redis

from rlhfspec_workers.faults import fault_point
from rlhfspec_workers.messages import Keys, LoadReport, MigrationOrder, SampleLoad, SampleTask
from rlhfspec_workers.runtime import Bus, StreamCursor

from .counters import GenerationCounters
from .records import StepRecord
from .sample_table import Sample, SampleStatus, SampleTable

KV_RATE_SMOOTHING = 0.3
PROFILE_STEPS = 256
"""Recent decoding steps the load report's step profile is taken over."""
PREFILL_STEPS = 32
"""Recent steps that also prefilled prompts, the load report's prefill rate is taken over."""

if TYPE_CHECKING:
    from .engine import GenerationEngine
    from .kv_migration import KVState
    from .kv_outbox import KVOutbox


class Handover:
    def __init__(
        self,
        bus: Bus,
        table: SampleTable,
        engine: GenerationEngine,
        outbox: KVOutbox | None,
        counters: GenerationCounters,
        max_running: int,
    ) -> None:
        self.bus = bus
        self.keys: Keys = bus.keys
        self.name = bus.env.worker
        self.table = table
        self.engine = engine
        self.outbox = outbox
        """Where this worker's KV snapshots wait for their destinations (None: recompute)."""
        self.counters = counters
        self.max_running = max_running
        self.finished_lengths: list[int] = []
        """Lengths of training samples finished here since the last load report."""
        self.recent_steps: deque[StepRecord] = deque(maxlen=PROFILE_STEPS)
        """Steps that only decoded: the step profile."""
        self.recent_prefills: deque[StepRecord] = deque(maxlen=PREFILL_STEPS)
        """Steps that also prefilled prompts: their time is no decode step's (a batch of 144
        prompts arriving at once made one step 11x the decode step at that batch size)."""
        self.orders_stream = self.keys.migrations_for(self.name)
        # Orders written before this process started were for a previous incarnation.
        self.orders = StreamCursor(
            self.orders_stream, MigrationOrder, self.bus.last_entry_id(self.orders_stream)
        )
        self.kv_send_rate: float | None = None
        """Bytes per second exporting and encoding snapshots (as a source), smoothed."""
        self.kv_receive_rate: float | None = None
        """Bytes per second decoding pulled snapshots (as a destination; the pull itself runs
        on a thread beside the engine), smoothed."""
        self.kv_frame_bytes_per_token: float | None = None
        """Snapshot bytes per context token as sent, smoothed: whole cache blocks travel, so
        a short context costs more per token than the cache layout alone says."""

    # -- migration ----------------------------------------------------------------------------

    def execute_orders(self) -> None:
        for _, order in self.bus.read_new(self.orders):
            self._execute(order)

    def _execute(self, order: MigrationOrder) -> None:
        table, engine = self.table, self.engine
        started = time.perf_counter()
        moved: list[SampleTask] = []
        wanted = set(order.sample_ids)
        # Not yet started: hand over as is (a snapshot being pulled is dropped: the next
        # destination recomputes).
        for sample in [s for s in table.waiting() if s.sample_id in wanted]:
            table.preempt(sample.sample_id)
            task = sample.task
            moved.append(task.model_copy(update={"migrations": task.migrations + 1}))
            self._hand(order, moved[-1])
            ack(self.bus, sample)
        for sample_id in order.sample_ids:
            running = table.get(sample_id)
            if running is None or running.status is not SampleStatus.RUNNING:
                continue  # finished (or moved) since the planner saw it
            task = running.task
            # Checked before preempting, which aborts: a sample at its budget finishes here.
            if engine.generated_so_far(sample_id) >= task.max_tokens:
                continue
            table.preempt(sample_id)
            kv_started = time.perf_counter()
            kv = engine.export_kv(sample_id) if order.mode == "kv_transfer" else None
            tokens, logprobs = engine.preempt(sample_id)
            self.counters.count_generated(task, len(tokens))
            kv_url = None
            if kv is not None and self.outbox is not None:
                kv_url = self._store_kv(self.outbox, task, kv, kv_started)
            moved.append(
                task.model_copy(
                    update={
                        "prefix_token_ids": [*task.prefix_token_ids, *tokens],
                        "prefix_logprobs": [*task.prefix_logprobs, *logprobs],
                        "max_tokens": task.max_tokens - len(tokens),
                        "migrations": task.migrations + 1,
                        "kv_snapshot_url": kv_url,
                    }
                )
            )
            # Publish the resumable state before acking: a crash in between duplicates the
            # sample (the done set drops the copy), it never loses it.
            self._hand(order, moved[-1])
            if kv_url is not None:
                fault_point("after_export_kv")
            ack(self.bus, running)
        seconds = time.perf_counter() - started
        moved_tokens = sum(len(t.prefix_token_ids) for t in moved)
        for task in moved:
            self.counters.add(task.iteration, "migrations", 1)
        if moved:
            self.counters.add(moved[0].iteration, "migrated_tokens", moved_tokens)
            self.counters.add(moved[0].iteration, "migration_seconds", seconds)
        self.bus.metrics.observe_migration(moved_tokens, seconds, samples=len(moved))

    def _store_kv(self, outbox: KVOutbox, task: SampleTask, kv: KVState, started: float) -> str:
        """Put the snapshot in the outbox (before the task that points at it is published)."""
        frame = kv.to_message(task.sample_id).to_bytes()
        url = outbox.put(f"{task.sample_id}#{task.migrations + 1}", frame)
        self.counters.add(task.iteration, "kv_migrations", 1)
        self.counters.add(task.iteration, "kv_snapshot_bytes", len(frame))
        seconds = time.perf_counter() - started
        self.kv_send_rate = _smooth(self.kv_send_rate, len(frame) / max(seconds, 1e-6))
        per_token = len(frame) / max(kv.num_tokens, 1)
        self.kv_frame_bytes_per_token = _smooth(self.kv_frame_bytes_per_token, per_token)
        return url

    def _kv_bytes_per_token(self) -> float:
        """0 without a KV path; measured once this worker sent a snapshot, else the layout's."""
        kv = self.engine.kv
        if kv is None:
            return 0.0
        return self.kv_frame_bytes_per_token or float(kv.bytes_per_token)

    def observe_kv_received(self, nbytes: int, seconds: float) -> None:
        self.kv_receive_rate = _smooth(self.kv_receive_rate, nbytes / max(seconds, 1e-6))

    @property
    def kv_bytes_per_second(self) -> float | None:
        """Engine time per snapshot byte: the source's export and the destination's decode
        add up (the block copy into vLLM's cache is ``MigrationCost.kv_fixed_seconds``)."""
        rates = [r for r in (self.kv_send_rate, self.kv_receive_rate) if r]
        return 1.0 / sum(1.0 / r for r in rates) if rates else None

    def _hand(self, order: MigrationOrder, task: SampleTask) -> None:
        self.bus.publish(self.keys.direct_tasks(order.destination), task)

    # -- load reports ------------------------------------------------------------------------

    def observe_step(self, step: StepRecord) -> None:
        (self.recent_prefills if step.prefill_tokens > 0 else self.recent_steps).append(step)
        fault_point("after_engine_step")  # tests hold a worker here: decoding stops between steps

    def observe_finished(self, length: int) -> None:
        """A training sample of ``length`` tokens finished here (the planner's length prior)."""
        self.finished_lengths.append(length)

    def report_load(self) -> None:
        running = [s.task for s in self.table.running()]
        samples = [
            SampleLoad(
                sample_id=task.sample_id,
                group_id=task.group_id,
                generated=len(task.prefix_token_ids) + self.engine.generated_so_far(task.sample_id),
                prompt_tokens=len(task.prompt),  # characters: an upper bound on tokens
                max_tokens=len(task.prefix_token_ids) + task.max_tokens,
                migrations=task.migrations,
            )
            for task in running
        ]
        samples += [
            SampleLoad(
                sample_id=task.sample_id,
                group_id=task.group_id,
                generated=len(task.prefix_token_ids),
                prompt_tokens=len(task.prompt),
                max_tokens=len(task.prefix_token_ids) + task.max_tokens,
                running=False,
                migrations=task.migrations,
            )
            for task in (s.task for s in self.table.waiting())
        ]
        report = LoadReport(
            worker=self.name,
            iteration=max((task.iteration for task in running), default=0),
            free_slots=max(self.max_running - len(samples), 0),
            samples=samples,
            finished_lengths=self.finished_lengths,
            step_profile=(profile := step_profile(self.recent_steps)),
            prefill_seconds_per_token=prefill_seconds_per_token(self.recent_prefills, profile),
            kv_bytes_per_token=self._kv_bytes_per_token(),
            kv_bytes_per_second=self.kv_bytes_per_second,
            updated_at=time.time(),
        )
        self.finished_lengths = []
        self.bus.put(self.keys.load(self.name), report)

    # -- leases and recovery -------------------------------------------------------------------

    def renew_leases(self) -> None:
        """XCLAIM to ourselves resets the idle time: a live worker keeps its long samples."""
        for stream, ids in self.table.entries_by_stream().items():
            self.bus.renew_leases(stream, Keys.GENERATION_GROUP, ids)

    def reclaim_from_dead_workers(self, lease_ms: int) -> None:
        """Take over tasks idle past the lease on the shared stream and on other workers'
        direct streams (migrated samples handed to a worker that died). A worker whose
        heartbeat is older than the lease is dead: samples handed to it that it never read
        (an order planned from its last load report, just before it died) are read here too,
        or they would wait forever in a stream nobody consumes."""
        free = self.max_running - len(self.table)
        if free <= 0:
            return
        now = time.time()
        others = {
            name: now - status.updated_at > lease_ms / 1000
            for name, status in self.bus.workers().items()
            if status.role == "generation" and name != self.name
        }
        streams = [(self.keys.tasks, False)] + [
            (self.keys.direct_tasks(name), dead) for name, dead in others.items()
        ]
        for stream, dead in streams:
            try:
                got = self.bus.reclaim(
                    stream, Keys.GENERATION_GROUP, SampleTask, min_idle_ms=lease_ms, count=free
                )
                if dead and len(got) < free:
                    got += self.bus.read_group(
                        stream, Keys.GENERATION_GROUP, SampleTask, count=free - len(got),
                        block_ms=None,
                    )  # fmt: skip
            except redis.ResponseError:  # NOGROUP: that worker never started consuming
                continue
            for entry_id, task in got:
                print(f"[rlhfspec] {self.name}: reclaimed {task.sample_id}", flush=True)
                self.counters.add(task.iteration, "reclaimed", 1)
                self.bus.metrics.observe_reclaimed(1)
                self.table.add(stream, entry_id, task)
            free -= len(got)
            if free <= 0:
                return


def ack(bus: Bus, sample: Sample) -> None:
    """Ack every stream entry ``sample`` was read as: it left this worker."""
    for stream, entry_ids in sample.entries_by_stream().items():
        bus.ack(stream, Keys.GENERATION_GROUP, *entry_ids)


def _smooth(old: float | None, value: float) -> float:
    """Exponential moving average; the first value starts it."""
    return value if old is None else old + KV_RATE_SMOOTHING * (value - old)


def step_profile(steps: Iterable[StepRecord]) -> list[list[float]]:
    """[batch size, seconds per step, tokens per sequence per step]: medians by batch size over
    decoding steps. A step's seconds are the engine's plus the worker's own work since the one
    before (its gap): a running sample advances at that pace, and the planner and the simulator
    read these rows as that pace (engine time alone made a 2-worker replay 10% optimistic on a
    2-core CPU)."""
    by_batch: dict[int, list[tuple[float, float]]] = {}
    for step in steps:
        if step.batch_size > 0:
            tokens = 1.0 + step.num_accepted_tokens / step.batch_size
            seconds = step.step_seconds + step.gap_seconds
            by_batch.setdefault(step.batch_size, []).append((seconds, tokens))
    rows = []
    for batch, values in sorted(by_batch.items()):
        seconds = sorted(v[0] for v in values)[len(values) // 2]
        tokens = sorted(v[1] for v in values)[len(values) // 2]
        rows.append([float(batch), seconds, tokens])
    return rows


def prefill_seconds_per_token(
    prefills: Iterable[StepRecord], profile: list[list[float]]
) -> float | None:
    """Median over steps that prefilled of (their seconds - the decode step's at the nearest
    profiled batch size) per prompt token: what re-prefilling a recomputed context costs
    here. None before any such step."""
    rates = []
    for step in prefills:
        if step.prefill_tokens <= 0:
            continue
        nearest = min(profile, key=lambda row: abs(row[0] - step.batch_size), default=None)
        extra = step.step_seconds + step.gap_seconds - (nearest[1] if nearest else 0.0)
        if extra > 0:
            rates.append(extra / step.prefill_tokens)
    return statistics.median(rates) if rates else None
