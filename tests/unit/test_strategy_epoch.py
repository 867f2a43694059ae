"""Strategy-table versions survive a coordinator restart (issue 18, "found by reading").

A restarted coordinator used to count table versions from 0 in memory while workers applied
only strictly newer ones, so every table it published after the restart was ignored. The
version now comes from a Redis counter. Real redis-server, the real coordinator broadcaster
and the real worker-side receiver (``generation.broadcast.StrategySync``) with an adaptive
strategy: the receiver must apply the tables of the coordinator object recreated after a restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bus_helpers import acceptance_report, bus_on, job_spec
from rlhfspec_workers.coordinator import strategy as strategy_module
from rlhfspec_workers.coordinator.strategy import StrategyBroadcaster
from rlhfspec_workers.generation.adaptive import AdaptiveStrategy
from rlhfspec_workers.generation.broadcast import StrategySync
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import AcceptanceReport, StrategyTable
from rlhfspec_workers.runtime import Bus
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector
from rlhfspec_workers.spec_decode.synthetic_cost import synthetic_cost_model

pytestmark = pytest.mark.timeout(60)

COST = synthetic_cost_model(
    drafters=[DrafterCost("draft_model", 0.0005, ((1, 0.0002), (256, 0.002)))]
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", password="secret") as srv:
        yield srv


def _bus(server: RedisServer, role: str) -> Bus:
    return bus_on(server, role, password="secret")


def _report(rate: float, drafts: int = 400, k: int = 8) -> AcceptanceReport:
    return acceptance_report("draft_model", rate, drafts=drafts, k=k)


def _receiver(server: RedisServer) -> tuple[StrategySync, AdaptiveStrategy]:
    strategy = AdaptiveStrategy(
        AdaptiveSelector(COST, 8), {"draft_model": AcceptanceEstimator("draft_model")}
    )
    return StrategySync(_bus(server, "generation"), "generation-0", strategy), strategy


def _publish_table(coordinator_bus: Bus, rate: float) -> StrategyTable:
    """A fresh coordinator object (what a restarted pod builds) publishes one table."""
    broadcaster = StrategyBroadcaster(job_spec(), coordinator_bus)
    for _ in range(5):
        coordinator_bus.publish(coordinator_bus.keys.acceptance, _report(rate))
    table = broadcaster.tick()
    assert table is not None
    return table


def test_a_restarted_coordinators_tables_are_applied(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(strategy_module, "TICK_SECONDS", 0.0)
    coordinator_bus = _bus(server, "coordinator")
    coordinator_bus.redis.set(coordinator_bus.keys.calibration, COST.to_json())
    sync, strategy = _receiver(server)

    first = _publish_table(coordinator_bus, rate=0.9)
    sync.flush(weight_version=0)
    assert strategy.table == first and sync.table_version == first.table_version

    # The coordinator restarts: a new object with nothing in memory; acceptance has collapsed,
    # so its table differs. The worker keeps running and must apply it.
    second = _publish_table(coordinator_bus, rate=0.05)
    assert second.table_version > first.table_version
    assert second.entries != first.entries
    sync.flush(weight_version=0)
    assert strategy.table == second and sync.table_version == second.table_version

    # The counter lives in Redis: a third coordinator keeps counting up.
    third = _publish_table(coordinator_bus, rate=0.9)
    assert third.table_version == second.table_version + 1
    sync.flush(weight_version=0)
    assert strategy.table == third


def test_a_table_after_redis_lost_its_state_is_still_applied(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were Redis ever to lose its data (no AOF), the counter starts over below what a worker
    holds; the key holds only the latest table, so the worker still applies it."""
    monkeypatch.setattr(strategy_module, "TICK_SECONDS", 0.0)
    coordinator_bus = _bus(server, "coordinator")
    coordinator_bus.redis.set(coordinator_bus.keys.calibration, COST.to_json())
    sync, strategy = _receiver(server)
    for rate in (0.9, 0.05, 0.9):
        _publish_table(coordinator_bus, rate)
    sync.flush(weight_version=0)
    assert sync.table_version == 3
    coordinator_bus.redis.flushall()
    coordinator_bus.redis.set(coordinator_bus.keys.calibration, COST.to_json())
    after = _publish_table(coordinator_bus, rate=0.05)
    assert after.table_version == 1
    sync.flush(weight_version=0)
    assert strategy.table == after and sync.table_version == 1
    sync.flush(weight_version=0)  # the same table again: nothing to apply, version unchanged
    assert sync.table_version == 1
