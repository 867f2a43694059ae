"""The worker bus against a real redis-server: dead letters, reclaim, restart with AOF, outages."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import FIELD, DeadLetter, Keys, SampleTask, WorkerStatus
from rlhfspec_workers.runtime import Bus, WorkerEnv

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", password="secret") as srv:
        yield srv


def _bus(server: RedisServer, worker_index: int = 0) -> Bus:
    env = WorkerEnv.from_environ(
        "generation",
        {
            "RLHFSPEC_JOB": "job",
            "RLHFSPEC_NAMESPACE": "ns",
            "RLHFSPEC_WORKER_INDEX": str(worker_index),
            "RLHFSPEC_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
            "RLHFSPEC_REDIS_PASSWORD": "secret",
            "RLHFSPEC_JOB_CONFIG": "/nonexistent/job.yaml",
        },
    )
    return Bus(env)


def _task(i: int) -> SampleTask:
    return SampleTask(
        iteration=1, sample_id=f"it1/p{i}/0", prompt_id=f"p{i}", group_id=f"row{i}",
        sample_index=0, prompt="S21=", max_tokens=4, temperature=1.0, top_p=1.0,
    )  # fmt: skip


def test_malformed_and_wrong_version_payloads_are_dead_lettered_with_the_sample_id(
    server: RedisServer,
) -> None:
    bus = _bus(server)
    keys = bus.keys
    bus.ensure_group(keys.tasks, Keys.GENERATION_GROUP)
    bus.publish(keys.tasks, _task(0))
    bus.redis.xadd(keys.tasks, {FIELD: b"{not json"})
    wrong = _task(1).to_bytes().replace(b'"version":1', b'"version":9')
    bus.redis.xadd(keys.tasks, {FIELD: wrong})
    got = bus.read_group(keys.tasks, Keys.GENERATION_GROUP, SampleTask, count=10, block_ms=100)
    assert [t.sample_id for _, t in got] == ["it1/p0/0"]
    letters = [
        DeadLetter.from_bytes(fields[FIELD]) for _, fields in bus.redis.xrange(keys.dead_letters)
    ]
    assert [letter.sample_id for letter in letters] == [None, "it1/p1/0"]
    assert "not JSON" in letters[0].reason and "version 9 unsupported" in letters[1].reason
    # Bad entries are acked (kept in the dead-letter stream instead): nothing stays pending.
    assert bus.redis.xpending(keys.tasks, Keys.GENERATION_GROUP)["pending"] == 1


def _two_consumers_of(server: RedisServer, *, tasks: int) -> tuple[Bus, Bus]:
    """Two generation consumers of the shared task stream, with ``tasks`` tasks published."""
    alive, dead = _bus(server, 0), _bus(server, 1)
    alive.ensure_group(alive.keys.tasks, Keys.GENERATION_GROUP)
    for i in range(tasks):
        alive.publish(alive.keys.tasks, _task(i))
    return alive, dead


def test_a_dead_consumers_entries_are_reclaimed_once(server: RedisServer) -> None:
    alive, dead = _two_consumers_of(server, tasks=4)
    keys = alive.keys
    taken = dead.read_group(keys.tasks, Keys.GENERATION_GROUP, SampleTask, count=4, block_ms=100)
    assert len(taken) == 4  # then the dead consumer never acks
    assert alive.reclaim(keys.tasks, Keys.GENERATION_GROUP, SampleTask, min_idle_ms=5000,
                         count=10) == []  # fmt: skip
    time.sleep(0.3)
    got = alive.reclaim(keys.tasks, Keys.GENERATION_GROUP, SampleTask, min_idle_ms=200, count=10)
    assert sorted(t.sample_id for _, t in got) == sorted(t.sample_id for _, t in taken)
    again = alive.reclaim(keys.tasks, Keys.GENERATION_GROUP, SampleTask, min_idle_ms=200, count=10)
    assert again == []  # ownership moved: a second sweep right away finds nothing idle


def test_reclaim_finds_a_dead_consumers_entries_behind_many_live_ones(
    server: RedisServer,
) -> None:
    alive, dead = _two_consumers_of(server, tasks=32)
    keys = alive.keys
    live = alive.read_group(keys.tasks, Keys.GENERATION_GROUP, SampleTask, count=30, block_ms=100)
    taken = dead.read_group(keys.tasks, Keys.GENERATION_GROUP, SampleTask, count=2, block_ms=100)
    time.sleep(0.3)
    # The live consumer renews its 30: XAUTOCLAIM's first call (10 x count) sees only those.
    alive.redis.xclaim(keys.tasks, Keys.GENERATION_GROUP, alive.env.worker, 0,
                       [entry_id for entry_id, _ in live], justid=True)  # fmt: skip
    got = alive.reclaim(keys.tasks, Keys.GENERATION_GROUP, SampleTask, min_idle_ms=200, count=1)
    assert [t.sample_id for _, t in got] == [taken[0][1].sample_id]


def _reclaiming_handover(bus: Bus) -> Any:
    """A worker's hand-over with an empty sample table and no engine (reclaim needs none)."""
    from rlhfspec_workers.generation.counters import GenerationCounters
    from rlhfspec_workers.generation.handover import Handover
    from rlhfspec_workers.generation.sample_table import SampleTable

    engine: Any = None
    return Handover(bus, SampleTable(), engine, None, GenerationCounters(), max_running=8)


@pytest.mark.parametrize("heartbeat_age", [0.0, 10.0])
def test_samples_handed_to_a_dead_worker_it_never_read_are_taken_over(
    server: RedisServer, heartbeat_age: float
) -> None:
    """A migration planned from a worker's last load report, just before it died, lands in
    a stream nobody reads: once its heartbeat is older than the lease, another takes it."""
    handover = _reclaiming_handover(_bus(server, 0))  # slow import: before the clock
    alive, dest = _bus(server, 0), _bus(server, 1)
    keys = alive.keys
    direct = keys.direct_tasks(dest.env.worker)
    dest.ensure_group(direct, Keys.GENERATION_GROUP)
    status = WorkerStatus(worker=dest.env.worker, role="generation",
                          updated_at=time.time() - heartbeat_age)  # fmt: skip
    alive.redis.hset(keys.workers, dest.env.worker, status.to_bytes())
    alive.publish(direct, _task(7))
    handover.reclaim_from_dead_workers(lease_ms=3000)
    taken = [sample.sample_id for sample in handover.table.waiting()]
    if heartbeat_age > 3.0:  # dead: taken over, once
        assert taken == ["it1/p7/0"]
        handover.reclaim_from_dead_workers(lease_ms=3000)
        assert len(handover.table) == 1 and handover.counters.drain() == {1: {"reclaimed": 1.0}}
    else:  # alive: the sample is its to read
        assert taken == []
        got = dest.read_group(direct, Keys.GENERATION_GROUP, SampleTask, count=5, block_ms=None)
        assert [t.sample_id for _, t in got] == ["it1/p7/0"]


def test_redis_restart_with_aof_keeps_everything_acknowledged(server: RedisServer) -> None:
    bus = _bus(server)
    keys = bus.keys
    bus.ensure_group(keys.tasks, Keys.GENERATION_GROUP)
    for i in range(6):
        bus.publish(keys.tasks, _task(i))
    got = bus.read_group(keys.tasks, Keys.GENERATION_GROUP, SampleTask, count=3, block_ms=100)
    bus.ack(keys.tasks, Keys.GENERATION_GROUP, got[0][0])
    server.kill()  # SIGKILL: no clean shutdown, only the append-only file survives
    server.restart()
    assert bus.redis.xlen(keys.tasks) == 6
    pending = bus.read_group(
        keys.tasks, Keys.GENERATION_GROUP, SampleTask, count=10, block_ms=0, pending=True
    )
    assert [t.sample_id for _, t in pending] == [t.sample_id for _, t in got[1:]]
    fresh = bus.read_group(keys.tasks, Keys.GENERATION_GROUP, SampleTask, count=10, block_ms=100)
    assert [t.sample_id for _, t in fresh] == [f"it1/p{i}/0" for i in range(3, 6)]


def test_workers_retry_through_a_redis_outage_and_report_it(
    server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    bus = _bus(server)
    bus.publish(bus.keys.tasks, _task(0))
    server.kill()
    restarter = threading.Timer(1.5, server.restart)
    restarter.start()
    try:
        assert bus.call("count", lambda: bus.redis.xlen(bus.keys.tasks)) == 1
    finally:
        restarter.join()
    assert bus.outages >= 1
    assert "redis unavailable during count" in capsys.readouterr().err


def test_inference_scores_each_sample_once_and_acks_every_entry(
    server: RedisServer, tiny_kit: Path
) -> None:
    """The batched scored-check and the one-transaction publish: a sample delivered twice in
    one batch, and one already scored before a restart, give no second experience; every
    entry is acked; each experience still belongs to its own rollout."""
    from rlhfspec_api.spec import RLHFJobSpec
    from rlhfspec_workers.inference.experience import ExperienceMaker
    from rlhfspec_workers.inference.worker import InferenceWorker
    from rlhfspec_workers.messages import Experience, Rollout
    from rlhfspec_workers.tinymodels.tokenizer import EOS_ID, encode_chars

    spec = RLHFJobSpec.model_validate(
        {
            "models": {"policy": {"path": "tiny://policy"}},
            "reward": {"type": "rule", "rule": "sort_digits"},
            "dataset": {"path": "tiny://dataset/train.jsonl"},
            "inference": {"batchSize": 8},
        }
    )
    maker = ExperienceMaker(spec, {"spec.models.policy": tiny_kit / "policy"})

    def rollout(i: int, text: str) -> Rollout:
        tokens = [*encode_chars(text), EOS_ID]
        return Rollout(
            iteration=1, sample_id=f"it1/p{i}/0", prompt_id=f"p{i}", group_id=f"p{i}",
            sample_index=0, prompt="S321=", answer="123",
            prompt_token_ids=encode_chars("S321=", add_bos=True), token_ids=tokens,
            logprobs=[-1.0] * len(tokens), text=text, finish_reason="stop",
            weight_version=0, worker="gen-0",
        )  # fmt: skip

    bus = _bus(server)
    keys = bus.keys
    bus.ensure_group(keys.rollouts, Keys.INFERENCE_GROUP)
    sent = [rollout(0, "123"), rollout(1, "1234567"), rollout(1, "1234567"), rollout(2, "12")]
    for r in sent:
        bus.publish(keys.rollouts, r)
    bus.redis.sadd(keys.scored_samples(1), "it1/p2/0")  # scored before a restart
    worker = InferenceWorker(SimpleNamespace(spec=spec), bus, maker)  # type: ignore[arg-type]
    batch = bus.read_group(keys.rollouts, Keys.INFERENCE_GROUP, Rollout, count=10, block_ms=100)
    worker._score(batch)
    published = [Experience.from_bytes(f[FIELD]) for _, f in bus.redis.xrange(keys.experience)]
    assert [e.rollout.sample_id for e in published] == ["it1/p0/0", "it1/p1/0"]
    assert [e.reward for e in published] == [1.0, 0.0]
    assert [len(e.ref_logprobs) for e in published] == [4, 8]
    assert bus.redis.smembers(keys.scored_samples(1)) == {b"it1/p0/0", b"it1/p1/0", b"it1/p2/0"}
    assert bus.redis.xpending(keys.rollouts, Keys.INFERENCE_GROUP)["pending"] == 0
    assert worker.scored == 2
