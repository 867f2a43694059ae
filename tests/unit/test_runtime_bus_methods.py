"""The Bus methods that keep Redis behind ``runtime.Bus`` (issue #21 item 3), on redis-server.

One read loop for every stream: a :class:`StreamCursor` reader (``read_new``, what the
migration orders and the coordinator's acceptance reports use) and a consumer group
(``read_group``) both decode each entry as its message and dead-letter one that does not
decode; the group also acks it. Then the keys holding the latest message, the counter, the
hash of float counters, lease renewal, and the worker names.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from bus_helpers import bus_on
from rlhfspec_workers.dead_letters import dead_letter_of
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import (
    FIELD,
    DeadLetter,
    JobFailure,
    Keys,
    LoadReport,
    MessageError,
    MigrationOrder,
    SampleTask,
)
from rlhfspec_workers.runtime import Bus, StreamCursor, parse_worker_name, worker_name

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def bus(password_redis: RedisServer, request: pytest.FixtureRequest) -> Bus:
    """A generation worker's bus on a job of its own (each test sees empty keys)."""
    return _bus(password_redis, job=request.node.name.replace("[", "-").rstrip("]"))


def _bus(server: RedisServer, *, job: str, index: int = 0) -> Bus:
    return bus_on(
        server, "generation", password="pw", RLHFSPEC_JOB=job, RLHFSPEC_WORKER_INDEX=str(index)
    )


def _order(n: int) -> MigrationOrder:
    return MigrationOrder(
        order_id=f"o{n}", source="generation-0", destination="generation-1",
        sample_ids=[f"it1/p{n}/0"],
    )  # fmt: skip


def _task(n: int) -> SampleTask:
    return SampleTask(
        iteration=1, sample_id=f"it1/p{n}/0", prompt_id=f"p{n}", group_id=f"row{n}",
        sample_index=0, prompt="S21=", max_tokens=4, temperature=1.0, top_p=1.0,
    )  # fmt: skip


def _letters(bus: Bus) -> list[DeadLetter]:
    entries: Any = bus.redis.xrange(bus.keys.dead_letters)
    return [DeadLetter.from_bytes(fields[FIELD]) for _, fields in entries]


def _add_raw(bus: Bus, stream: str, fields: dict[bytes, bytes]) -> str:
    """An entry written past the bus (a writer of another version, a corrupted payload)."""
    entry_id: Any = bus.redis.xadd(stream, fields)  # type: ignore[arg-type]
    return str(entry_id.decode())


def _pending_owners(bus: Bus, stream: str, group: str) -> dict[str, str]:
    pending: Any = bus.redis.xpending_range(stream, group, min="-", max="+", count=100)
    return {p["message_id"].decode(): p["consumer"].decode() for p in pending}


# -- reading a stream with a cursor --------------------------------------------------------


def test_read_new_decodes_in_order_and_moves_the_cursor(bus: Bus) -> None:
    stream = bus.keys.migrations_for("generation-0")
    ids = [bus.publish(stream, _order(n)) for n in range(3)]
    cursor = StreamCursor(stream, MigrationOrder)
    got = bus.read_new(cursor)
    assert [(entry_id, order.order_id) for entry_id, order in got] == list(
        zip(ids, ["o0", "o1", "o2"], strict=True)
    )
    assert cursor.last_id == ids[-1]
    assert bus.read_new(cursor) == []  # nothing new: nothing read twice
    later = bus.publish(stream, _order(3))
    assert [(i, o.order_id) for i, o in bus.read_new(cursor)] == [(later, "o3")]


def test_read_new_reads_at_most_count_and_the_rest_next_time(bus: Bus) -> None:
    stream = bus.keys.migrations_for("generation-0")
    for n in range(5):
        bus.publish(stream, _order(n))
    cursor = StreamCursor(stream, MigrationOrder)
    assert [o.order_id for _, o in bus.read_new(cursor, count=2)] == ["o0", "o1"]
    assert [o.order_id for _, o in bus.read_new(cursor, count=10)] == ["o2", "o3", "o4"]


def test_read_new_dead_letters_what_does_not_decode_and_reads_on(bus: Bus) -> None:
    stream = bus.keys.migrations_for("generation-0")
    cursor = StreamCursor(stream, MigrationOrder)
    first = bus.publish(stream, _order(0))
    not_json = _add_raw(bus, stream, {FIELD: b"{not json"})
    # Another kind on this stream (a task where an order belongs) names its sample.
    wrong_kind = _add_raw(bus, stream, {FIELD: _task(7).to_bytes()})
    newer = _order(1).to_bytes().replace(b'"version":1', b'"version":9')
    wrong_version = _add_raw(bus, stream, {FIELD: newer})
    last = bus.publish(stream, _order(2))
    got = bus.read_new(cursor)
    assert [(i, o.order_id) for i, o in got] == [(first, "o0"), (last, "o2")]
    assert cursor.last_id == last
    letters = _letters(bus)
    assert [(d.source_stream, d.entry_id) for d in letters] == [
        (stream, not_json),
        (stream, wrong_kind),
        (stream, wrong_version),
    ]
    assert "not JSON" in letters[0].reason and letters[0].raw == "{not json"
    assert "kind 'sample_task' is not 'migration_order'" in letters[1].reason
    assert letters[1].sample_id == "it1/p7/0"
    assert "version 9 unsupported" in letters[2].reason
    assert bus.read_new(cursor) == []  # a bad entry is dead-lettered once, not on every read
    assert len(_letters(bus)) == 3


def test_read_new_dead_letters_an_entry_without_the_data_field(bus: Bus) -> None:
    stream = bus.keys.migrations_for("generation-0")
    bad = _add_raw(bus, stream, {b"other": b"1"})
    cursor = StreamCursor(stream, MigrationOrder)
    assert bus.read_new(cursor) == []
    assert cursor.last_id == bad
    assert [(d.entry_id, d.raw) for d in _letters(bus)] == [(bad, "")]


def test_a_cursor_at_the_last_entry_reads_only_later_entries(bus: Bus) -> None:
    stream = bus.keys.migrations_for("generation-0")
    assert bus.last_entry_id(stream) == "0-0"  # no stream yet
    bus.publish(stream, _order(0))
    newest = bus.publish(stream, _order(1))
    assert bus.last_entry_id(stream) == newest
    cursor = StreamCursor(stream, MigrationOrder, bus.last_entry_id(stream))
    assert bus.read_new(cursor) == []
    bus.publish(stream, _order(2))
    assert [o.order_id for _, o in bus.read_new(cursor)] == ["o2"]


# -- reading through a consumer group (the same loop, plus acks) -----------------------------


def test_read_group_dead_letters_and_acks_what_does_not_decode(bus: Bus) -> None:
    stream, group = bus.keys.tasks, Keys.GENERATION_GROUP
    bus.ensure_group(stream, group)
    bus.publish(stream, _task(0))
    bad = _add_raw(bus, stream, {FIELD: b"[1, 2]"})
    got = bus.read_group(stream, group, SampleTask, count=10, block_ms=None)
    assert [t.sample_id for _, t in got] == ["it1/p0/0"]
    assert [(d.entry_id, d.reason) for d in _letters(bus)] == [
        (bad, "expected a JSON object, got list")
    ]
    assert list(_pending_owners(bus, stream, group)) == [got[0][0]]  # only the good one


def test_renewed_leases_are_not_reclaimed_and_stale_ones_are(password_redis: RedisServer) -> None:
    holder = _bus(password_redis, job="leases", index=0)
    other = _bus(password_redis, job="leases", index=1)
    stream, group = holder.keys.tasks, Keys.GENERATION_GROUP
    holder.ensure_group(stream, group)
    for n in range(2):
        holder.publish(stream, _task(n))
    held = holder.read_group(stream, group, SampleTask, count=2, block_ms=None)
    time.sleep(0.3)
    holder.renew_leases(stream, group, [held[0][0]])  # the first is still being generated
    taken = other.reclaim(stream, group, SampleTask, min_idle_ms=200, count=10)
    assert [t.sample_id for _, t in taken] == ["it1/p1/0"]
    owners = _pending_owners(holder, stream, group)
    assert owners == {held[0][0]: "generation-0", held[1][0]: "generation-1"}
    holder.renew_leases(stream, group, [])  # nothing held: no call, no error


# -- keys holding the latest value, counters -------------------------------------------------


def test_put_and_get_a_message(bus: Bus) -> None:
    key = bus.keys.load("generation-0")
    assert bus.get(key, LoadReport) is None
    bus.put(key, LoadReport(worker="generation-0", iteration=1, free_slots=3))
    bus.put(key, LoadReport(worker="generation-0", iteration=2, free_slots=1))
    latest = bus.get(key, LoadReport)
    assert latest is not None and (latest.iteration, latest.free_slots) == (2, 1)
    with pytest.raises(MessageError, match="kind 'load_report' is not 'job_failure'"):
        bus.get(key, JobFailure)


def test_raw_values_round_trip(bus: Bus) -> None:
    key = bus.keys.calibration
    assert bus.get_raw(key) is None
    bus.put_raw(key, '{"model": "cost"}')
    assert bus.get_raw(key) == b'{"model": "cost"}'


def test_increment_counts_from_one_across_bus_instances(
    password_redis: RedisServer, bus: Bus
) -> None:
    key = bus.keys.strategy_version
    assert [bus.increment(key), bus.increment(key)] == [1, 2]
    restarted = _bus(password_redis, job=bus.env.job)  # a restarted coordinator continues the count
    assert restarted.increment(key) == 3


def test_add_to_hash_accumulates_float_counters(bus: Bus) -> None:
    key = bus.keys.generation_stats(1)
    bus.add_to_hash(key, {"migrations": 1, "migration_seconds": 0.25})
    bus.add_to_hash(key, {"migrations": 2, "migration_seconds": 0.5, "reclaimed": 1})
    bus.add_to_hash(key, {})
    raw: Any = bus.redis.hgetall(key)
    stored = {k.decode(): float(v) for k, v in raw.items()}
    assert stored == {"migrations": 3.0, "migration_seconds": 0.75, "reclaimed": 1.0}


# -- worker names and dead letters (no Redis) ------------------------------------------------


def test_worker_names_round_trip() -> None:
    assert worker_name("generation", 3) == "generation-3"
    parsed = parse_worker_name("generation-12")
    assert (parsed.role, parsed.index) == ("generation", 12)
    assert parse_worker_name(worker_name("trainer", 0)).index == 0


@pytest.mark.parametrize(
    "name",
    ["generation", "generation-", "generation-x", "generation-01", "generation--1", "bench-0"],
)
def test_a_name_not_built_by_worker_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=rf"worker name '{name}' is not <role>-<index>"):
        parse_worker_name(name)


def test_worker_name_refuses_an_unknown_role_or_a_negative_index() -> None:
    with pytest.raises(ValueError, match=r"worker role 'bench' unknown \(allowed: coordinator"):
        worker_name("bench", 0)
    with pytest.raises(ValueError, match="worker index -1 is negative"):
        worker_name("generation", -1)


def test_the_bus_consumer_name_is_the_worker_name(bus: Bus) -> None:
    assert bus.env.worker == worker_name("generation", 0) == "generation-0"


def test_a_dead_letter_names_a_wrapped_rollouts_sample_and_keeps_bad_bytes() -> None:
    wrapped = b'{"kind": "experience", "rollout": {"sample_id": "it2/p1/3"}}'
    letter = dead_letter_of("s", "5-0", wrapped, "invalid")
    assert (letter.source_stream, letter.entry_id, letter.sample_id) == ("s", "5-0", "it2/p1/3")
    assert dead_letter_of("s", "6-0", b"\xff{", "not JSON").raw == "\ufffd{"
