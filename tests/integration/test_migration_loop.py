"""Migration between real generation workers: an order moves running samples mid-flight from
one worker (a real process serving vLLM) to another, and the stitched rollouts are exactly what
no migration gives, whether the destination recomputes the moved prefix or loads its KV cache
blocks (``migration: kv``: the destination pulls the snapshot from the source's outbox over
HTTP and its vLLM loads it through the MigrationConnector).

Greedy decoding makes two samples of one prompt identical, so a migrated sample is checked
token for token against its unmigrated sibling, with log-probs aligned. Lengths are fixed
(``ignore_eos``) and every task is handed to one worker in one transaction, which is held
(``RLHFSPEC_HOLD``) after its HOLD_STEP-th engine step until the order is in Redis: the order
always finds the moved samples a few tokens in, whatever the machine's load (a load report's
0.5 s period is most of a tiny sample's life, so waiting for an early report is a race).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhfspec_workers.faults import HOLD_ENV_VAR, hold_markers, parse_fault
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.local.supervisor import Supervisor, local_worker_env
from rlhfspec_workers.messages import FIELD, MigrationOrder, Rollout, SampleTask
from rlhfspec_workers.runtime import Bus, WorkerEnv

pytestmark = pytest.mark.timeout(900)

PROMPTS, MAX_TOKENS = 12, 100
"""100 of the tiny policy's 128 positions: most of a moved sample is decoded after the move."""
SOURCE, DESTINATION = "generation-0", "generation-1"
HOLD_STEP = 8
"""The source stops after this engine step until the order is sent: one token per step (the
first with the prefill), so every sample is at most HOLD_STEP tokens in."""
MOVING = ["it1/p0/0", "it1/p1/0", "it1/p2/0"]
"""What the order moves: running on the source at the hold (every task starts in step 1)."""


def _manifest(migration: str) -> dict[str, Any]:
    return {
        "apiVersion": "rlhfspec.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": "migrate"},
        "spec": {
            "algorithm": {
                "promptsPerIteration": PROMPTS,
                "samplesPerPrompt": 2,
                "microBatchSize": 24,
                "miniBatches": 1,
            },
            "models": {"policy": {"path": "tiny://policy"}},
            "dataset": {"path": "tiny://dataset/train.jsonl"},
            "generation": {
                "replicas": 2,
                "maxNewTokens": MAX_TOKENS,
                # fp32 on every CPU: in bf16 (native on AMX machines) a sample computed in
                # another batch, or from a moved KV cache, rounds differently (log-probs
                # 4e-3 apart), and greedy tokens may flip at near-ties.
                "dtype": "float32",
                "speculative": {"mode": "off"},
                # Only the test's order moves samples; `migration` decides the workers' KV path.
                "reallocation": {"enabled": False, "migration": migration},
            },
            "storage": {"size": "1Gi"},
        },
    }


def _tasks() -> list[SampleTask]:
    rng = random.Random(0)
    tasks = []
    for p in range(PROMPTS):
        prompt = "S" + "".join(rng.choice("0123456789") for _ in range(10)) + "="
        for index in (0, 1):
            tasks.append(
                SampleTask(
                    iteration=1,
                    sample_id=f"it1/p{p}/{index}",
                    prompt_id=f"p{p}",
                    group_id=f"p{p}",
                    sample_index=index,
                    prompt=prompt,
                    max_tokens=MAX_TOKENS,
                    temperature=0.0,
                    top_p=1.0,
                    ignore_eos=True,
                )
            )
    return tasks


@pytest.mark.parametrize("mode", ["recompute", "kv_transfer"])
def test_ordered_migration_moves_running_samples_and_stitches_them_exactly(
    tiny_kit: Path, tmp_path: Path, mode: str
) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_manifest("recompute" if mode == "recompute" else "kv")))
    with RedisServer(tmp_path / "redis", password="test") as server:
        env = local_worker_env(
            job="migrate", namespace="default", replicas=2, redis_port=server.port,
            redis_password="test", job_config=config, storage=tmp_path,
        )  # fmt: skip
        env[HOLD_ENV_VAR] = f"{SOURCE}:after_engine_step:{HOLD_STEP}"
        held, release = hold_markers(tmp_path, SOURCE, parse_fault(env[HOLD_ENV_VAR]))
        supervisor = Supervisor(tmp_path, env)
        try:
            for index in (0, 1):
                supervisor.start("generation", index)
            bus = Bus(WorkerEnv.from_environ("coordinator", env))
            keys = bus.keys
            deadline = time.monotonic() + 600

            def wait(what: str, condition: Any) -> None:
                while not condition():
                    crashed = supervisor.exited()
                    assert not crashed, f"{what}: {crashed[0][0].name}\n{crashed[0][0].tail(30)}"
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    time.sleep(0.05)

            wait("both workers ready", lambda: sum(
                s.state == "ready" for s in bus.workers().values()) == 2)  # fmt: skip
            tasks = _tasks()

            def publish(pipe: Any) -> None:
                for task in tasks:
                    bus.queue_publish(pipe, keys.direct_tasks(SOURCE), task)

            # One transaction: the source reads every task at once, so all start in one step.
            bus.pipelined("publish tasks", publish)
            wait(f"the source held after engine step {HOLD_STEP}", held.exists)
            moving = list(MOVING)
            first_scrape = _scrape(supervisor, SOURCE)
            order = MigrationOrder(
                order_id="test-1", source=SOURCE, destination=DESTINATION, sample_ids=moving,
                mode=mode,  # type: ignore[arg-type]
            )  # fmt: skip
            bus.publish(keys.migrations_for(SOURCE), order)
            release.touch()  # the order is in Redis: the source reads it before its next step
            wait("every sample", lambda: bus.redis.scard(keys.done_samples(1)) == len(tasks))
            time.sleep(1.0)  # one more heartbeat: counters are exported as they happen
            second_scrape = _scrape(supervisor, SOURCE)
            rollouts = [Rollout.from_bytes(f[FIELD]) for _, f in bus.redis.xrange(keys.rollouts)]
            stats = {k.decode(): float(v) for k, v in
                     bus.redis.hgetall(keys.generation_stats(1)).items()}  # fmt: skip
        finally:
            supervisor.stop()
    # The source worker's /metrics, scraped over HTTP before and after: counters moved, and
    # carry the job/role/worker labels.
    labels = f'job="migrate",role="generation",worker="{SOURCE}"'
    steps = [_value(text, "rlhfspec_generation_steps_total", labels) for text in
             (first_scrape, second_scrape)]  # fmt: skip
    assert 0 < steps[0] <= HOLD_STEP < steps[1]  # the first scrape is of the held source
    migrations = [_value(text, "rlhfspec_migrations_total", labels, missing=0.0) for text in
                  (first_scrape, second_scrape)]  # fmt: skip
    assert migrations == [0.0, 3.0]
    by_id = {r.sample_id: r for r in rollouts}
    assert len(rollouts) == len(by_id) == len(tasks)  # every sample exactly once
    migrated = sorted(r.sample_id for r in rollouts if r.migrations > 0)
    assert migrated == sorted(moving)  # each was running, held a few tokens in
    assert 0 < stats["migrated_tokens"] <= len(moving) * HOLD_STEP
    for sample_id in moving:
        r, sibling = by_id[sample_id], by_id[sample_id[:-1] + "1"]
        assert r.worker == DESTINATION and sibling.worker == SOURCE and sibling.migrations == 0
        assert len(r.token_ids) == MAX_TOKENS
        assert r.token_ids == sibling.token_ids
        assert r.logprobs == pytest.approx(sibling.logprobs, abs=1e-4)
        assert len(r.logprobs) == len(r.token_ids)
    assert stats.get("kv_fallbacks", 0.0) == 0.0
    # Every token is counted once, by the worker that decoded it: the moved samples' prefixes
    # on the source, the rest on the destination (tokens/s and the trace rest on this).
    assert stats["tokens"] == sum(len(r.token_ids) for r in rollouts)
    if mode == "kv_transfer":
        # Each snapshot was pulled from the source and loaded inside the destination's vLLM step.
        assert stats["kv_migrations"] == 3.0 and stats["kv_snapshot_bytes"] > 0
        assert stats["kv_receive_seconds"] > 0 and stats["kv_load_seconds"] > 0
    else:
        assert "kv_migrations" not in stats and "kv_load_seconds" not in stats


def _scrape(supervisor: Any, worker: str) -> str:
    """GET /metrics of a worker process (local mode binds a free port and logs it)."""
    import re
    import urllib.request

    log = next(w for w in supervisor.workers if w.name == worker).log_path.read_text()
    port = re.search(r"metrics on :(\d+)", log)
    assert port is not None, log[-2000:]
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as r:
        return str(r.read().decode())


def _value(text: str, name: str, labels: str, missing: float | None = None) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    if missing is not None:  # a labelled counter appears on its first increment
        return missing
    raise AssertionError(f"{name}{{{labels}}} not exported")
