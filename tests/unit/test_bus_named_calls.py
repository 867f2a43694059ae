"""The named Bus methods that replaced raw Redis calls in the roles (issue #21 item 3).

On a real redis-server, each method against what the workers write: the stop flag and a
reported failure, removing a key, the generation workers' load reports, the done and scored
sets, the generation counters, held-out scores, the coordinator's state hash, the history of
a record stream (skipping what does not decode, dead-lettering nothing), stream lengths, a
blocking read with a cursor, the entries as named pairs, and a bus that does not retry.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from bus_helpers import bus_on
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import (
    FIELD,
    EvalScore,
    IterationMetrics,
    JobFailure,
    LoadReport,
    MigrationOrder,
    StorageFull,
)
from rlhfspec_workers.redis_retry import OUTAGE_ERRORS
from rlhfspec_workers.runtime import Bus, StreamCursor, StreamEntry, WorkerEnv

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def bus(password_redis: RedisServer, request: pytest.FixtureRequest) -> Bus:
    """The coordinator's bus on a job of its own (each test sees empty keys)."""
    job = request.node.name.replace("[", "-").rstrip("]")
    return bus_on(password_redis, "coordinator", password="pw", RLHFSPEC_JOB=job)


def _load(worker: str, free_slots: int) -> LoadReport:
    return LoadReport(worker=worker, iteration=1, free_slots=free_slots)


def _row(iteration: int) -> IterationMetrics:
    return IterationMetrics(iteration=iteration, total_iterations=3)


def _dead_letters(bus: Bus) -> int:
    return int(bus.redis.xlen(bus.keys.dead_letters))


# -- flags and keys ------------------------------------------------------------------------


def test_request_stop_is_what_workers_poll_and_a_restart_clears_it(bus: Bus) -> None:
    assert not bus.stop_requested()
    bus.request_stop()
    assert bus.stop_requested()
    failure = JobFailure(worker="inference-0", field="reward", reason="cannot score")
    bus.put(bus.keys.failure, failure)
    bus.clear_stop_and_failure()
    assert not bus.stop_requested()
    assert bus.get(bus.keys.failure, JobFailure) is None
    bus.clear_stop_and_failure()  # nothing to clear: no error


def test_remove_says_whether_the_key_held_a_value(bus: Bus) -> None:
    key = bus.keys.storage_full
    assert bus.remove(key) is False
    full = StorageFull(
        worker="trainer-0", path="/data", needed_bytes=2, free_bytes=1, message="full"
    )
    bus.put(key, full)
    assert bus.remove(key) is True
    assert bus.get(key, StorageFull) is None
    assert bus.remove(key) is False


def test_latest_loads_in_worker_order_without_absent_or_unreadable_ones(bus: Bus) -> None:
    bus.put(bus.keys.load("generation-0"), _load("generation-0", 3))
    bus.put(bus.keys.load("generation-2"), _load("generation-2", 5))
    bus.put_raw(bus.keys.load("generation-3"), b'{"kind": "load_report", "version": 99}')
    names = ["generation-2", "generation-1", "generation-0", "generation-3"]
    got = bus.latest_loads(names)
    assert [(r.worker, r.free_slots) for r in got] == [("generation-2", 5), ("generation-0", 3)]
    assert bus.latest_loads([]) == []


# -- an iteration's progress -------------------------------------------------------------------


def test_done_and_scored_counts_are_per_iteration_and_count_each_sample_once(bus: Bus) -> None:
    keys = bus.keys

    def mark(pipe: Any) -> None:  # as the generation and inference workers mark samples
        for sample in ("it1/p0/0", "it1/p1/0", "it1/p0/0"):
            pipe.sadd(keys.done_samples(1), sample)
        pipe.sadd(keys.done_samples(2), "it2/p0/0")
        pipe.sadd(keys.scored_samples(1), "it1/p1/0")

    assert (bus.samples_done(1), bus.samples_scored(1)) == (0, 0)
    bus.pipelined("mark", mark)
    assert (bus.samples_done(1), bus.samples_done(2), bus.samples_scored(1)) == (2, 1, 1)
    assert bus.samples_scored(2) == 0


def test_generation_stats_reads_back_the_added_counters_as_floats(bus: Bus) -> None:
    assert bus.generation_stats(1) == {}
    bus.add_to_hash(bus.keys.generation_stats(1), {"migrations": 2, "kv_pull_seconds": 0.5})
    bus.add_to_hash(bus.keys.generation_stats(1), {"migrations": 1})
    bus.add_to_hash(bus.keys.generation_stats(2), {"migrations": 7})
    assert bus.generation_stats(1) == {"migrations": 3.0, "kv_pull_seconds": 0.5}


def test_eval_scores_one_per_sample_and_their_count(bus: Bus) -> None:
    keys = bus.keys
    scores = [
        EvalScore(
            weight_version=2, sample_id=f"eval2/p{n}/0", reward=float(n % 2), response_tokens=4
        )
        for n in range(3)
    ]

    def write(pipe: Any) -> None:  # as the inference worker writes them (HSET per sample)
        for score in [*scores, scores[0]]:  # a redelivered sample overwrites its own score
            pipe.hset(keys.eval_scores(score.weight_version), score.sample_id, score.to_bytes())

    assert (bus.eval_scores_count(2), bus.eval_scores(2)) == (0, [])
    bus.pipelined("write", write)
    assert bus.eval_scores_count(2) == 3
    got = sorted(bus.eval_scores(2), key=lambda s: s.sample_id)
    assert [(s.sample_id, s.reward) for s in got] == [(s.sample_id, s.reward) for s in scores]
    assert bus.eval_scores_count(1) == 0


def test_coordinator_state_updates_fields_and_keeps_the_others(bus: Bus) -> None:
    assert bus.coordinator_state() == {}
    bus.update_coordinator_state(
        {"iteration": 3, "samples": 16, "published:3": 1, "started_at": 12.5}
    )
    bus.update_coordinator_state({"eval-published:3": 1, "iteration": 4})
    assert bus.coordinator_state() == {
        "iteration": "4",
        "samples": "16",
        "published:3": "1",
        "started_at": "12.5",
        "eval-published:3": "1",
    }


# -- streams -----------------------------------------------------------------------------------


def test_history_reads_every_row_and_skips_what_does_not_decode(bus: Bus) -> None:
    stream = bus.keys.metrics_stream
    assert bus.history(stream, IterationMetrics) == []
    first = bus.publish(stream, _row(1))
    bus.redis.xadd(stream, {FIELD: b'{"kind": "iteration_metrics", "version": 99}'})
    bus.redis.xadd(stream, {b"other": b"1"})
    second = bus.publish(stream, _row(2))
    got = bus.history(stream, IterationMetrics)
    assert [(e.entry_id, e.message.iteration) for e in got] == [(first, 1), (second, 2)]
    # Read again at every start: nothing is dead-lettered, nothing consumed.
    assert _dead_letters(bus) == 0
    assert [row.iteration for _, row in bus.history(stream, IterationMetrics)] == [1, 2]


def test_stream_length_counts_every_entry(bus: Bus) -> None:
    stream = bus.keys.metrics_stream
    assert bus.stream_length(stream) == 0
    for n in range(3):
        bus.publish(stream, _row(n + 1))
    assert bus.stream_length(stream) == 3


def test_entries_are_named_pairs(bus: Bus) -> None:
    stream = bus.keys.migrations_for("generation-0")
    order = MigrationOrder(
        order_id="o1", source="generation-0", destination="generation-1", sample_ids=["s"]
    )
    entry_id = bus.publish(stream, order)
    (entry,) = bus.read_new(StreamCursor(stream, MigrationOrder))
    assert isinstance(entry, StreamEntry)
    assert (entry.entry_id, entry.message.order_id) == (entry_id, "o1")
    got_id, got_order = entry  # still a pair for callers that unpack it
    assert (got_id, got_order) == (entry_id, order)


def test_read_new_with_block_waits_for_the_first_entry(
    password_redis: RedisServer, bus: Bus
) -> None:
    stream = bus.keys.metrics_stream
    rows = StreamCursor(stream, IterationMetrics)
    started = time.monotonic()
    assert bus.read_new(rows, block_ms=300) == []
    assert time.monotonic() - started >= 0.25  # it waited
    writer = bus_on(password_redis, "coordinator", password="pw", RLHFSPEC_JOB=bus.env.job)
    later = threading.Timer(0.2, lambda: writer.publish(stream, _row(1)))
    later.start()
    started = time.monotonic()
    got = bus.read_new(rows, block_ms=10_000)
    later.join()
    assert [(e.message.iteration) for e in got] == [1]
    assert time.monotonic() - started < 5.0  # woken by the entry, not by the timeout
    assert rows.last_id == got[0].entry_id


# -- retries ---------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_bus_without_retries_raises_an_outage_at_once() -> None:
    env = WorkerEnv.from_environ(
        "coordinator",
        {
            "RLHFSPEC_JOB": "job",
            "RLHFSPEC_REDIS_URL": f"redis://127.0.0.1:{_closed_port()}/0",
            "RLHFSPEC_JOB_CONFIG": "/nonexistent.yaml",
        },
    )
    bus = Bus(env, retry_seconds=0)
    started = time.monotonic()
    with pytest.raises(OUTAGE_ERRORS):
        bus.stop_requested()
    assert time.monotonic() - started < 3.0
    assert bus.outages == 0  # not retried, so not reported as a retried outage
