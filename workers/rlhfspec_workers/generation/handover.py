"""How a generation worker gives samples away and takes them over: migration and recovery.

Where it sits: inside the generation worker's loop (``worker.GenerationWorker``), between the
engine and Redis. Every heartbeat it publishes a :class:`LoadReport` (what it holds, how far
each sample got) for the coordinator's reallocation planner; it executes the planner's
:class:`MigrationOrder`s addressed to it (abort the sample in vLLM, hand its tokens and
log-probs to the destination's direct stream with ``max_tokens`` reduced, then ack the
original task; a ``kv_transfer`` order also puts the sample's KV cache blocks in this worker's
outbox for the destination to pull and load instead of re-prefilling, see ``kv_migration``
and ``kv_outbox``); it renews the lease on everything it holds; and it reclaims tasks of
workers that stopped renewing theirs (a dead worker's samples finish elsewhere, each exactly
once: XAUTOCLAIM moves ownership, the done set filters duplicates).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import redis

from rlhfspec_workers.faults import fault_point
from rlhfspec_workers.messages import Keys, LoadReport, MigrationOrder, SampleLoad, SampleTask
from rlhfspec_workers.runtime import StreamCursor

KV_RATE_SMOOTHING = 0.3

if TYPE_CHECKING:
    from .kv_migration import KVState
    from .kv_outbox import KVOutbox
    from .worker import GenerationWorker


class Handover:
    def __init__(self, worker: GenerationWorker) -> None:
        self.worker = worker
        self.bus = worker.bus
        self.keys: Keys = worker.keys
        self.orders_stream = self.keys.migrations_for(worker.name)
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
        worker = self.worker
        started = time.perf_counter()
        moved: list[SampleTask] = []
        wanted = set(order.sample_ids)
        # Not yet started: hand over as is.
        for held in [h for h in worker.waiting if h[2].sample_id in wanted]:
            worker.waiting.remove(held)
            stream, entry_id, task = held
            worker.forget_pull(task.sample_id)
            moved.append(task.model_copy(update={"migrations": task.migrations + 1}))
            self._hand(order, moved[-1])
            self.bus.ack(stream, Keys.GENERATION_GROUP, entry_id)
        for sample_id in order.sample_ids:
            flight = worker.in_flight.get(sample_id)
            if flight is None:
                continue  # finished (or moved) since the planner saw it
            task = flight.task
            # Checked before preempting, which aborts: a sample at its budget finishes here.
            if worker.engine.generated_so_far(flight.request_id) >= task.max_tokens:
                continue
            del worker.in_flight[sample_id]
            kv_started = time.perf_counter()
            kv = worker.engine.export_kv(flight.request_id) if order.mode == "kv_transfer" else None
            tokens, logprobs = worker.engine.preempt(flight.request_id)
            worker.count_generated(task, len(tokens))
            kv_url = None
            if kv is not None and worker.outbox is not None:
                kv_url = self._store_kv(worker.outbox, task, kv, kv_started)
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
            self.bus.ack(flight.stream, Keys.GENERATION_GROUP, flight.entry_id)
        seconds = time.perf_counter() - started
        moved_tokens = sum(len(t.prefix_token_ids) for t in moved)
        for task in moved:
            worker.counters.add(task.iteration, "migrations", 1)
        if moved:
            worker.counters.add(moved[0].iteration, "migrated_tokens", moved_tokens)
            worker.counters.add(moved[0].iteration, "migration_seconds", seconds)
        self.bus.metrics.observe_migration(moved_tokens, seconds, samples=len(moved))

    def _store_kv(self, outbox: KVOutbox, task: SampleTask, kv: KVState, started: float) -> str:
        """Put the snapshot in the outbox (before the task that points at it is published)."""
        frame = kv.to_message(task.sample_id).to_bytes()
        url = outbox.put(f"{task.sample_id}#{task.migrations + 1}", frame)
        self.worker.counters.add(task.iteration, "kv_migrations", 1)
        self.worker.counters.add(task.iteration, "kv_snapshot_bytes", len(frame))
        seconds = time.perf_counter() - started
        self.kv_send_rate = _smooth(self.kv_send_rate, len(frame) / max(seconds, 1e-6))
        per_token = len(frame) / max(kv.num_tokens, 1)
        self.kv_frame_bytes_per_token = _smooth(self.kv_frame_bytes_per_token, per_token)
        return url

    def _kv_bytes_per_token(self) -> float:
        """0 without a KV path; measured once this worker sent a snapshot, else the layout's."""
        kv = self.worker.engine.kv
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

    def report_load(self) -> None:
        worker = self.worker
        samples = [
            SampleLoad(
                sample_id=f.task.sample_id,
                group_id=f.task.group_id,
                generated=len(f.task.prefix_token_ids)
                + worker.engine.generated_so_far(f.request_id),
                prompt_tokens=len(f.task.prompt),  # characters: an upper bound on tokens
                max_tokens=len(f.task.prefix_token_ids) + f.task.max_tokens,
                migrations=f.task.migrations,
            )
            for f in worker.in_flight.values()
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
            for _, _, task in worker.waiting
        ]
        iterations = [s.task.iteration for s in worker.in_flight.values()]
        report = LoadReport(
            worker=worker.name,
            iteration=max(iterations, default=0),
            free_slots=max(worker.max_running - len(samples), 0),
            samples=samples,
            finished_lengths=worker.finished_lengths,
            step_profile=self._profile(),
            kv_bytes_per_token=self._kv_bytes_per_token(),
            kv_bytes_per_second=self.kv_bytes_per_second,
            updated_at=time.time(),
        )
        worker.finished_lengths = []
        self.bus.put(self.keys.load(worker.name), report)

    def _profile(self) -> list[list[float]]:
        """Median step time and tokens per sequence per step, by batch size, over recent steps."""
        by_batch: dict[int, list[tuple[float, float]]] = {}
        for step in self.worker.recent_steps:
            if step.batch_size > 0:
                tokens = 1.0 + step.num_accepted_tokens / step.batch_size
                by_batch.setdefault(step.batch_size, []).append((step.step_seconds, tokens))
        rows = []
        for batch, values in sorted(by_batch.items()):
            seconds = sorted(v[0] for v in values)[len(values) // 2]
            tokens = sorted(v[1] for v in values)[len(values) // 2]
            rows.append([float(batch), seconds, tokens])
        return rows

    # -- leases and recovery -------------------------------------------------------------------

    def renew_leases(self) -> None:
        """XCLAIM to ourselves resets the idle time: a live worker keeps its long samples."""
        by_stream: dict[str, list[Any]] = {}
        for flight in self.worker.in_flight.values():
            by_stream.setdefault(flight.stream, []).append(flight.entry_id)
        for stream, entry_id, _ in self.worker.waiting:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            self.bus.renew_leases(stream, Keys.GENERATION_GROUP, ids)

    def reclaim_from_dead_workers(self, lease_ms: int) -> None:
        """Take over tasks idle past the lease on the shared stream and on other workers'
        direct streams (migrated samples handed to a worker that died). A worker whose
        heartbeat is older than the lease is dead: samples handed to it that it never read
        (an order planned from its last load report, just before it died) are read here too,
        or they would wait forever in a stream nobody consumes."""
        worker = self.worker
        free = worker.max_running - len(worker.in_flight) - len(worker.waiting)
        if free <= 0:
            return
        now = time.time()
        others = {
            name: now - status.updated_at > lease_ms / 1000
            for name, status in self.bus.workers().items()
            if status.role == "generation" and name != worker.name
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
                print(f"[rlhfspec] {worker.name}: reclaimed {task.sample_id}", flush=True)
                worker.counters.add(task.iteration, "reclaimed", 1)
                self.bus.metrics.observe_reclaimed(1)
                worker.waiting.append((stream, entry_id, task))
            free -= len(got)
            if free <= 0:
                return


def _smooth(old: float | None, value: float) -> float:
    """Exponential moving average; the first value starts it."""
    return value if old is None else old + KV_RATE_SMOOTHING * (value - old)
