"""Migration through the running system: an order to a real generation worker moves samples
mid-flight to another real worker, and the stitched rollouts are what no migration gives.

Greedy decoding makes two samples of one prompt identical, so a migrated sample is checked
token for token against its unmigrated sibling, with log-probs aligned.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_workers.local.run import LocalRun, prepare_run_dir
from rlhfspec_workers.messages import Keys, LoadReport, MigrationOrder, Rollout

pytestmark = pytest.mark.timeout(900)


def _job() -> Any:
    return parse_rlhfjob(
        {
            "apiVersion": "rlhfspec.io/v1alpha1",
            "kind": "RLHFJob",
            "metadata": {"name": "migrate"},
            "spec": {
                "algorithm": {
                    "iterations": 1,
                    "promptsPerIteration": 12,
                    "samplesPerPrompt": 2,
                    "microBatchSize": 24,
                    "miniBatches": 1,
                },
                "models": {"policy": {"path": "tiny://policy"}},
                "dataset": {"path": "tiny://dataset/train.jsonl"},
                "generation": {
                    "replicas": 2,
                    "maxNewTokens": 48,
                    "temperature": 0.0,
                    "speculative": {"mode": "off"},
                    "reallocation": {"enabled": False},  # only the test's order moves samples
                },
                "storage": {"size": "1Gi"},
            },
        }
    )


def test_ordered_migration_moves_running_samples_and_stitches_them_exactly(
    tiny_kit: Path, tmp_path: Path
) -> None:
    job = _job()
    config = prepare_run_dir(tmp_path, job, None, resume=False)
    local = LocalRun(job, tmp_path, config, resume=False)
    try:
        client, supervisor = local.start()
        keys = Keys("default", job.name)
        deadline = time.monotonic() + 600
        source = destination = ""
        moving: list[str] = []
        while not moving:
            assert time.monotonic() < deadline, "no worker ever held running samples"
            for name, other in (("generation-0", "generation-1"), ("generation-1", "generation-0")):
                raw = client.get(keys.load(name))
                report = LoadReport.from_bytes(raw) if raw else None
                running = [
                    s for s in (report.samples if report else [])
                    if s.running and s.generated > 0 and s.sample_id.endswith("/0")
                ]  # fmt: skip
                if len(running) >= 2:
                    source, destination = name, other
                    moving = [s.sample_id for s in running[:3]]
                    break
            time.sleep(0.05)
        first_scrape = _scrape(supervisor, source)
        order = MigrationOrder(
            order_id="test-1", source=source, destination=destination, sample_ids=moving
        )
        client.xadd(keys.migrations_for(source), {b"data": order.to_bytes()})
        # Generation done, job not yet (the trainer runs): the workers still serve /metrics.
        while client.scard(keys.done_samples(1)) < 24:
            assert time.monotonic() < deadline, "generation did not finish"
            time.sleep(0.1)
        second_scrape = _scrape(supervisor, source)
        coordinator = supervisor.workers[0]
        while coordinator.process.poll() is None:
            assert time.monotonic() < deadline, coordinator.tail(30)
            time.sleep(0.2)
        assert coordinator.process.returncode == 0, coordinator.tail(30)
        rollouts = [Rollout.from_bytes(f[b"data"]) for _, f in client.xrange(keys.rollouts)]
        done = client.scard(keys.done_samples(1))
    finally:
        local.stop()
    # The source worker's /metrics, scraped over HTTP before and after: counters moved, and
    # carry the job/role/worker labels.
    labels = f'job="migrate",role="generation",worker="{source}"'
    steps = [_value(text, "rlhfspec_generation_steps_total", labels) for text in
             (first_scrape, second_scrape)]  # fmt: skip
    assert 0 < steps[0] < steps[1]
    assert _value(second_scrape, "rlhfspec_migrations_total", labels) >= 1
    by_id = {r.sample_id: r for r in rollouts}
    assert done == 24 and len(by_id) == 24  # every sample exactly once
    migrated = [r for r in rollouts if r.migrations > 0]
    # A sample may finish before the order arrives; most of the chosen ones are in flight.
    assert migrated, "no sample was migrated"
    for r in migrated:
        assert r.sample_id in moving and r.worker == destination
        sibling = by_id[r.sample_id[:-1] + "1"]
        assert sibling.migrations == 0
        assert r.token_ids == sibling.token_ids
        assert r.logprobs == pytest.approx(sibling.logprobs, abs=1e-4)
        assert len(r.logprobs) == len(r.token_ids)


def _scrape(supervisor: Any, worker: str) -> str:
    """GET /metrics of a worker process (local mode binds a free port and logs it)."""
    import re
    import urllib.request

    log = next(w for w in supervisor.workers if w.name == worker).log_path.read_text()
    port = re.search(r"metrics on :(\d+)", log)
    assert port is not None, log[-2000:]
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as r:
        return str(r.read().decode())


def _value(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{labels}}} not exported")
