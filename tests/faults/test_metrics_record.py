"""The coordinator's metrics record after a restart (issue 18, docs/faults.md "Known gaps").

A coordinator killed between writing a row to the Redis metrics stream and to
``metrics.jsonl``, or in the middle of the file's line, must not leave the file short or
broken; and a restarted coordinator finds the weights of the exact iteration it records, even
once later weights are published. Real redis-server, the coordinator's own functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhfspec_workers.coordinator.metrics_record import (
    last_recorded_iteration,
    recorded_rows,
    repair_metrics_file,
    weights_of,
)
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import IterationMetrics, WeightsPublished
from rlhfspec_workers.runtime import Bus, WorkerEnv

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    with RedisServer(tmp_path / "redis", password="secret") as server:
        env = WorkerEnv.from_environ(
            "coordinator",
            {
                "RLHFSPEC_JOB": "job",
                "RLHFSPEC_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
                "RLHFSPEC_REDIS_PASSWORD": "secret",
                "RLHFSPEC_JOB_CONFIG": "/nonexistent.yaml",
            },
        )
        yield Bus(env)


def _row(iteration: int) -> IterationMetrics:
    return IterationMetrics(iteration=iteration, total_iterations=3, samples=8)


def test_a_file_cut_mid_row_and_a_row_short_is_completed_from_the_stream(
    bus: Bus, tmp_path: Path
) -> None:
    for iteration in (1, 2, 3):
        bus.publish(bus.keys.metrics_stream, _row(iteration))
    path = tmp_path / "metrics.jsonl"
    # Row 1 whole, row 2 cut mid-line (the coordinator killed while writing it), row 3 absent.
    whole = json.dumps(_row(1).model_dump(mode="json")) + "\n"
    path.write_text(whole + json.dumps(_row(2).model_dump(mode="json"))[:40])
    rows = recorded_rows(bus)
    assert last_recorded_iteration(rows) == 3
    assert repair_metrics_file(path, rows) == [2, 3]
    lines = path.read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    assert repair_metrics_file(path, rows) == []  # nothing twice on a second restart
    assert len(path.read_text().splitlines()) == 3


def test_no_row_yet_resumes_at_iteration_one(bus: Bus, tmp_path: Path) -> None:
    assert last_recorded_iteration(recorded_rows(bus)) == 0
    assert repair_metrics_file(tmp_path / "metrics.jsonl", []) == []


def test_the_weights_of_the_recorded_iteration_not_the_latest(bus: Bus) -> None:
    assert weights_of(bus, 1) is None
    for iteration in (1, 2):
        message = WeightsPublished(
            policy_version=iteration, iteration=iteration, path=f"/w/v{iteration}",
            reward_mean=float(iteration),
        )  # fmt: skip
        bus.redis.set(bus.keys.weights, message.to_bytes())
        bus.publish(bus.keys.weights_log, message)
    one, two = weights_of(bus, 1), weights_of(bus, 2)
    assert one is not None and one.reward_mean == 1.0 and one.path == "/w/v1"
    assert two is not None and two.reward_mean == 2.0
    assert weights_of(bus, 3) is None
