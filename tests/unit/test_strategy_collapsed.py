"""A collapsed drafter reaches the coordinator's progress (the operator's DrafterCollapsed).

Real redis-server, real Bus: generation workers' AcceptanceReports are pooled by the
coordinator's ``StrategyBroadcaster``, which keeps each collapsed drafter's mean accepted
length (and forgets it once the drafter recovers); the coordinator's progress writer puts that
map into ``JobProgress.collapsed_drafters``, where the operator reads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bus_helpers import acceptance_report, bus_on, job_spec
from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_workers.coordinator import strategy as strategy_module
from rlhfspec_workers.coordinator.loop import Coordinator
from rlhfspec_workers.coordinator.strategy import StrategyBroadcaster
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import AcceptanceReport, JobProgress
from rlhfspec_workers.preflight import ResolvedPaths
from rlhfspec_workers.runtime import Bus

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bus]:
    monkeypatch.setattr(strategy_module, "TICK_SECONDS", 0.0)
    with RedisServer(tmp_path / "redis") as server:
        yield bus_on(server)


def _report(drafter: str, rate: float, drafts: int = 400, k: int = 4) -> AcceptanceReport:
    return acceptance_report(drafter, rate, drafts=drafts, k=k, weight_version=3)


def _feed(bus: Bus, broadcaster: StrategyBroadcaster, *reports: AcceptanceReport) -> None:
    for report in reports:
        bus.publish(bus.keys.acceptance, report)
    broadcaster.tick()  # no calibration published: it pools the reports and stops there


def test_the_broadcaster_keeps_each_collapsed_drafters_mean_until_it_recovers(
    bus: Bus, capsys: pytest.CaptureFixture[str]
) -> None:
    broadcaster = StrategyBroadcaster(job_spec(), bus)
    _feed(bus, broadcaster, _report("draft_model", 0.01), _report("ngram", 0.8))
    assert set(broadcaster.collapsed) == {"draft_model"}  # the healthy drafter is not in it
    mean = broadcaster.collapsed["draft_model"]
    assert 1.0 <= mean <= 1.1
    assert mean == broadcaster.estimators["draft_model"].mean_accepted_length
    out = capsys.readouterr().out
    assert "WARNING: drafter draft_model collapsed: mean accepted length 1.0" in out

    # Still collapsed: the mean follows the pooled estimate; the warning is not repeated.
    _feed(bus, broadcaster, _report("draft_model", 0.0))
    assert broadcaster.collapsed["draft_model"] < mean
    assert "WARNING" not in capsys.readouterr().out

    # Acceptance comes back (e.g. a refreshed draft): the drafter leaves the map.
    _feed(bus, broadcaster, _report("draft_model", 0.9), _report("draft_model", 0.9))
    assert not broadcaster.estimators["draft_model"].collapsed
    assert broadcaster.collapsed == {}


def test_a_refreshed_draft_is_trusted_again(bus: Bus) -> None:
    """A new draft version published with the weights drops the old draft's pooled evidence
    and its collapse: the next table may choose it again. The same version changes nothing."""
    broadcaster = StrategyBroadcaster(job_spec(), bus)
    _feed(bus, broadcaster, _report("draft_model", 0.01), _report("ngram", 0.8))
    assert set(broadcaster.collapsed) == {"draft_model"}
    broadcaster.draft_published(0)  # the draft as given: nothing new
    assert set(broadcaster.collapsed) == {"draft_model"}
    broadcaster.draft_published(None)  # no refreshed draft in this job
    assert "draft_model" in broadcaster.estimators
    broadcaster.draft_published(2)
    assert broadcaster.collapsed == {} and "draft_model" not in broadcaster.estimators
    assert "ngram" in broadcaster.estimators  # other drafters' evidence stays
    _feed(bus, broadcaster, _report("draft_model", 0.9))
    assert broadcaster.estimators["draft_model"].mean_accepted_length > 2.0


def _coordinator(bus: Bus, tmp_path: Path) -> Coordinator:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": "1"}) + "\n"
                            for i in range(4)))  # fmt: skip
    return Coordinator(parse_rlhfjob(doc), ResolvedPaths({}, data), bus)


def test_the_coordinators_progress_carries_the_collapsed_drafters(bus: Bus, tmp_path: Path) -> None:
    coordinator = _coordinator(bus, tmp_path)

    def written() -> JobProgress:
        coordinator._progress(1, "running", "iteration 2: generating")
        progress = bus.get(bus.keys.progress, JobProgress)
        assert progress is not None
        return progress

    assert written().collapsed_drafters == {}  # nothing reported yet
    _feed(bus, coordinator.strategy, _report("draft_model", 0.01), _report("ngram", 0.8))
    collapsed = written().collapsed_drafters
    assert list(collapsed) == ["draft_model"]
    assert collapsed["draft_model"] == pytest.approx(coordinator.strategy.collapsed["draft_model"])
    _feed(bus, coordinator.strategy, *[_report("draft_model", 0.9)] * 2)
    assert written().collapsed_drafters == {}  # recovered: the operator clears the condition
