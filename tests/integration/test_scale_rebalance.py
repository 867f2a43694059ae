"""A scaled job rebalances (#19 item 6): the coordinator's reallocation planner works over the
generation workers that heartbeat, not the replica count it started with, against a real
redis-server.

``kubectl scale rlhfjob X --replicas N`` (``spec.generation.replicas``) makes the operator
create or delete generation pods while the coordinator keeps running with the
``RLHFSPEC_REPLICAS`` of its own start. A worker added by a scale-up must receive migrated
samples; one deleted by a scale-down (stopping, or its load report gone stale) must receive
none. Its unacked samples are not lost: the others reclaim them after the task lease, as for
any worker that dies. ``test_bus_faults`` covers that against a real redis-server
(``test_a_dead_consumers_entries_are_reclaimed_once``,
``test_samples_handed_to_a_dead_worker_it_never_read_are_taken_over``) and
``test_rlhf_loop`` end to end on real vLLM (a generation worker killed mid-iteration; every
sample of the iteration is still trained exactly once).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus_helpers import bus_on, job_spec
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.coordinator.reallocate import Reallocator
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import LoadReport, MigrationOrder, SampleLoad, WorkerStatus
from rlhfspec_workers.runtime import FIELD, Bus

ITERATION = 1
MAX_TOKENS = 512
# [batch size, seconds per step, tokens per sequence per step]: a step costs more with more
# sequences, so a worker holding 24 long samples finishes far later than an idle one.
STEP_PROFILE = [[1.0, 0.010, 1.0], [8.0, 0.016, 1.0], [24.0, 0.030, 1.0]]


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    with RedisServer(tmp_path / "redis") as server:
        # The coordinator started before the scale-up, with one replica.
        yield bus_on(server, RLHFSPEC_REPLICAS="1")


def spec() -> RLHFJobSpec:
    generation = {
        "replicas": 1,
        "maxNewTokens": MAX_TOKENS,
        "reallocation": {"enabled": True, "migration": "recompute"},
    }
    return job_spec(dataset={"path": "tiny://dataset/train.jsonl"}, generation=generation)


def heartbeat(bus: Bus, worker: str, state: str = "busy") -> None:
    bus.heartbeat(WorkerStatus(worker=worker, role="generation", state=state))  # type: ignore[arg-type]


def report(bus: Bus, worker: str, samples: int, free_slots: int) -> None:
    loads = [
        SampleLoad(
            sample_id=f"{worker}-s{i}",
            group_id=f"{worker}-g{i // 4}",
            generated=8,
            prompt_tokens=16,
            max_tokens=MAX_TOKENS,
        )
        for i in range(samples)
    ]
    payload = LoadReport(
        worker=worker,
        iteration=ITERATION,
        free_slots=free_slots,
        samples=loads,
        step_profile=STEP_PROFILE,
        updated_at=time.time(),
    )
    bus.redis.set(bus.keys.load(worker), payload.to_bytes())


def orders_to(bus: Bus, source: str) -> list[MigrationOrder]:
    entries: Any = bus.redis.xrange(bus.keys.migrations_for(source))
    return [MigrationOrder.from_bytes(fields[FIELD]) for _, fields in entries]


def test_a_worker_added_by_scale_up_receives_migrations(bus: Bus) -> None:
    reallocator = Reallocator(spec(), bus, replicas=1)
    assert reallocator.enabled  # a one-replica start may still be scaled up
    reallocator.interval = 0.0
    heartbeat(bus, "generation-0")
    report(bus, "generation-0", samples=24, free_slots=0)
    assert reallocator.tick(ITERATION) == 0  # alone: nothing to move

    # Scaled to 2: the new pod heartbeats and reports an empty engine.
    heartbeat(bus, "generation-1")
    report(bus, "generation-1", samples=0, free_slots=24)
    assert reallocator.worker_names() == ["generation-0", "generation-1"]
    moved = reallocator.tick(ITERATION)
    assert moved > 0
    orders = orders_to(bus, "generation-0")
    assert orders and {o.destination for o in orders} == {"generation-1"}
    moved_ids = [sample for o in orders for sample in o.sample_ids]
    assert len(moved_ids) == moved and len(set(moved_ids)) == moved
    assert set(moved_ids) <= {f"generation-0-s{i}" for i in range(24)}


def test_a_worker_removed_by_scale_down_receives_none(bus: Bus) -> None:
    reallocator = Reallocator(spec(), bus, replicas=3)  # started with 3 replicas
    reallocator.interval = 0.0
    for worker, samples, free in (
        ("generation-0", 24, 0),
        ("generation-1", 0, 24),
        ("generation-2", 0, 24),
    ):
        heartbeat(bus, worker)
        report(bus, worker, samples, free)
    # Scaled to 2: generation-2's pod got SIGTERM and said it is stopping.
    heartbeat(bus, "generation-2", state="stopping")
    assert reallocator.worker_names() == ["generation-0", "generation-1"]
    assert reallocator.tick(ITERATION) > 0
    destinations = {o.destination for o in orders_to(bus, "generation-0")}
    assert destinations == {"generation-1"}
