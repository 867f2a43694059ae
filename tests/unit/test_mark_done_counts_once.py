"""A published sample's figures are added to its iteration's gen-stats hash exactly once.

On a real redis-server: ``Bus.queue_mark_done`` (the generation worker's publish transaction,
``generation/worker.py`` ``_finish``) marks a sample done and adds its tokens only when the
sample was not done yet, so a copy published again (two workers, or a transaction re-sent after
a lost reply) changes neither the done set nor the figures.
"""

from __future__ import annotations

from typing import Any

import pytest

from bus_helpers import bus_on
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.runtime import Bus

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def bus(password_redis: RedisServer, request: pytest.FixtureRequest) -> Bus:
    return bus_on(password_redis, "generation", password="pw", RLHFSPEC_JOB=request.node.name)


def _publish(bus: Bus, samples: list[tuple[str, int]]) -> list[Any]:
    keys = bus.keys

    def build(pipe: Any) -> None:
        for sample_id, tokens in samples:
            figures = {"tokens": float(tokens), "samples": 1.0}
            stats = keys.generation_stats(1)
            bus.queue_mark_done(pipe, keys.done_samples(1), sample_id, stats, figures)

    return bus.pipelined("publish", build)


def test_each_sample_counts_once_however_often_it_is_published(bus: Bus) -> None:
    assert _publish(bus, [("it1/p0/0", 5), ("it1/p0/1", 7)]) == [1, 1]
    assert bus.generation_stats(1) == {"tokens": 12.0, "samples": 2.0}
    # The same transaction re-sent, and a copy within one transaction: nothing is added.
    assert _publish(bus, [("it1/p0/0", 5), ("it1/p0/1", 7)]) == [0, 0]
    assert _publish(bus, [("it1/p1/0", 3), ("it1/p1/0", 3)]) == [1, 0]
    assert bus.generation_stats(1) == {"tokens": 15.0, "samples": 3.0}
    assert bus.samples_done(1) == 3


def test_figures_already_in_the_hash_are_added_to(bus: Bus) -> None:
    # The heartbeat's other figures share the hash: the script adds, it never overwrites.
    bus.add_to_hash(bus.keys.generation_stats(1), {"sequence_steps": 4.0, "tokens": 0.0})
    _publish(bus, [("it1/p0/0", 9)])
    assert bus.generation_stats(1) == {"sequence_steps": 4.0, "tokens": 9.0, "samples": 1.0}
