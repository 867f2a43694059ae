"""Strategy broadcast over a real redis-server: pooled acceptance -> versioned table, and the
table follows acceptance when it drops (e.g. a stale drafter after a weight sync)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bus_helpers import acceptance_report, bus_on, job_spec
from rlhfspec_workers.coordinator import strategy as strategy_module
from rlhfspec_workers.coordinator.strategy import StrategyBroadcaster
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import AcceptanceReport, StrategyTable
from rlhfspec_workers.runtime import Bus
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.synthetic_cost import synthetic_cost_model


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    with RedisServer(tmp_path / "redis") as server:
        yield bus_on(server)


def _report(worker: str, rate: float, drafts: int = 400, k: int = 8) -> AcceptanceReport:
    return acceptance_report("draft_model", rate, drafts=drafts, k=k, worker=worker)


def test_pooled_acceptance_gives_a_versioned_table_that_follows_a_drop(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(strategy_module, "TICK_SECONDS", 0.0)
    draft = DrafterCost("draft_model", 0.0005, ((1, 0.0002), (256, 0.002)))
    cost = synthetic_cost_model(drafters=[draft])
    bus.redis.set(bus.keys.calibration, cost.to_json())
    broadcaster = StrategyBroadcaster(job_spec(), bus)
    assert broadcaster.tick() is None  # no acceptance evidence yet: no table
    for worker in ("generation-0", "generation-1"):  # pooled over both workers
        bus.publish(bus.keys.acceptance, _report(worker, 0.9))
    first = broadcaster.tick()
    assert first is not None and first.table_version == 1
    stored = StrategyTable.from_bytes(bus.redis.get(bus.keys.strategy))
    assert stored == first
    ks = {e.max_batch: e.k for e in first.entries}
    assert ks[1] >= ks[256]  # verification is dear at large batch: k shrinks as B grows
    assert max(ks.values()) > 0
    assert broadcaster.tick() is None  # nothing new: no new version
    # Acceptance collapses (stale drafter): the table turns speculation down.
    for _ in range(20):
        bus.publish(bus.keys.acceptance, _report("generation-0", 0.05))
    second = broadcaster.tick()
    assert second is not None and second.table_version == 2
    assert sum(e.k for e in second.entries) < sum(e.k for e in first.entries)
    assert second.acceptance["draft_model"][0] < first.acceptance["draft_model"][0]
