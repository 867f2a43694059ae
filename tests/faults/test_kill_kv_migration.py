"""A generation worker SIGKILLed during a KV migration, on either side, and restarted: every
sample still finishes, with exactly the tokens no migration gives.

Two real generation workers (real vLLM, real redis-server, ``migration: kv``). The source gets
every task at once and is held (``RLHFSPEC_HOLD``) after its HOLD_STEP-th engine step, every
sample a few tokens in; the test then sends a hand-made KV-transfer order moving two of them to
the other worker (as ``tests/integration/test_migration_loop.py`` does, without a fault) and
releases it, so the order always finds them early, however loaded the machine. One worker
carries ``RLHFSPEC_FAULT``: the source dies right after handing a sample over (snapshot in its
outbox, its own task unacked: ``after_export_kv``), or the destination dies after pulling the
snapshot, before vLLM loads it (``before_import_kv``). The test restarts it as a kubelet would.
Greedy decoding makes a prompt's two samples identical, so each sample is checked token for
token against its sibling, which no order moved.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhfspec_workers.faults import ENV_VAR, HOLD_ENV_VAR, hold_markers, parse_fault
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.local.supervisor import Supervisor, local_worker_env
from rlhfspec_workers.messages import MigrationOrder, Rollout, SampleTask
from rlhfspec_workers.runtime import Bus, WorkerEnv

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

PROMPTS, MAX_TOKENS = 6, 100
SOURCE, DESTINATION = "generation-0", "generation-1"
HOLD_STEP = 8
"""The source stops after this engine step until the order is sent: one token per step (the
first with the prefill), so every sample is at most HOLD_STEP of MAX_TOKENS tokens in."""
MOVING = ["it1/p0/0", "it1/p1/0"]
"""What the order moves: running on the source at the hold (every task starts in step 1)."""


def _manifest() -> dict[str, Any]:
    return {
        "apiVersion": "rlhfspec.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": "migrate"},
        "spec": {
            "algorithm": {
                "promptsPerIteration": PROMPTS,
                "samplesPerPrompt": 2,
                "microBatchSize": 12,
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
                "reallocation": {"enabled": False, "migration": "kv"},
            },
            "storage": {"size": "1Gi"},
        },
    }


def _tasks() -> list[SampleTask]:
    """Fixed-length (``ignore_eos``) greedy samples: still running when the order arrives."""
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


@dataclass
class MigrationRun:
    killed: list[str]
    moving: list[str]
    rollouts: list[Rollout]
    done: int
    stats: dict[str, float]
    fired: list[str]


def _run(tmp_path: Path, fault: str) -> MigrationRun:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_manifest()))
    killed: list[str] = []
    with RedisServer(tmp_path / "redis", password="test") as server:
        env = local_worker_env(
            job="migrate",
            namespace="default",
            replicas=2,
            redis_port=server.port,
            redis_password="test",
            job_config=config,
            storage=tmp_path,
        )
        env[ENV_VAR] = fault  # both workers see it; it names one (faults.FaultSpec)
        env[HOLD_ENV_VAR] = f"{SOURCE}:after_engine_step:{HOLD_STEP}"
        held, release = hold_markers(tmp_path, SOURCE, parse_fault(env[HOLD_ENV_VAR]))
        supervisor = Supervisor(tmp_path, env)
        try:
            for index in (0, 1):
                supervisor.start("generation", index)
            bus = Bus(WorkerEnv.from_environ("coordinator", env))
            keys = bus.keys
            deadline = time.monotonic() + 600
            handled: set[int] = set()

            def wait(what: str, condition: Callable[[], bool]) -> None:
                while not condition():
                    for worker, rc in supervisor.exited():
                        if id(worker) in handled:
                            continue
                        handled.add(id(worker))
                        assert rc == -9, f"{what}: {worker.name} exited {rc}\n{worker.tail(30)}"
                        killed.append(worker.name)
                        supervisor.start("generation", int(worker.name.rsplit("-", 1)[1]))
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    time.sleep(0.05)

            wait(
                "both workers ready",
                lambda: sum(s.state == "ready" for s in bus.workers().values()) == 2,
            )
            tasks = _tasks()

            def publish(pipe: Any) -> None:
                for task in tasks:
                    bus.queue_publish(pipe, keys.direct_tasks(SOURCE), task)

            # One transaction: the source reads every task at once, so all start in one step.
            bus.pipelined("publish tasks", publish)
            wait(f"the source held after engine step {HOLD_STEP}", held.exists)
            moving = list(MOVING)
            order = MigrationOrder(
                order_id="fault-1",
                source=SOURCE,
                destination=DESTINATION,
                sample_ids=moving,
                mode="kv_transfer",
            )
            bus.publish(keys.migrations_for(SOURCE), order)
            release.touch()  # the order is in Redis: the source reads it before its next step
            wait("every sample", lambda: bus.redis.scard(keys.done_samples(1)) == len(tasks))
            time.sleep(1.0)  # one more heartbeat: counters are flushed as they happen
            client: Any = bus.redis
            rollouts = [Rollout.from_bytes(f[b"data"]) for _, f in client.xrange(keys.rollouts)]
            stats = {
                k.decode(): float(v) for k, v in client.hgetall(keys.generation_stats(1)).items()
            }
            done = int(client.scard(keys.done_samples(1)))
        finally:
            supervisor.stop()
    fired = sorted(p.name for p in (tmp_path / "faults").glob("*.fired"))
    return MigrationRun(killed, moving, rollouts, done, stats, fired)


def _assert_every_sample_equals_its_unmoved_sibling(run: MigrationRun) -> None:
    assert run.done == 2 * PROMPTS
    by_id: dict[str, list[Rollout]] = {}
    for rollout in run.rollouts:
        by_id.setdefault(rollout.sample_id, []).append(rollout)
    assert sorted(by_id) == sorted(t.sample_id for t in _tasks())
    for p in range(PROMPTS):
        # A restarted worker may finish a task it never acked that another also finished
        # (at-least-once delivery): every copy must be the same sample.
        reference = by_id[f"it1/p{p}/1"][0]
        assert reference.migrations == 0  # no order names a "/1" sample
        for rollout in by_id[f"it1/p{p}/0"] + by_id[f"it1/p{p}/1"]:
            assert len(rollout.token_ids) == MAX_TOKENS
            assert rollout.token_ids == reference.token_ids, rollout.sample_id
            assert rollout.logprobs == pytest.approx(reference.logprobs, abs=1e-4)


def test_migration_source_killed_after_handing_over_a_kv_snapshot(tmp_path: Path) -> None:
    run = _run(tmp_path, f"{SOURCE}:after_export_kv:1")
    assert run.killed == [SOURCE]
    assert run.fired == [f"{SOURCE}.after_export_kv.1.fired"]
    _assert_every_sample_equals_its_unmoved_sibling(run)
    # The handed-over sample was finished by the destination (from the snapshot when its pull
    # beat the kill, else recomputing: the outbox died with the source); the restarted source
    # may finish its unacked original too, and the done set keeps one.
    moved = [r for r in run.rollouts if r.sample_id in run.moving and r.migrations > 0]
    assert moved and all(r.worker == DESTINATION for r in moved)


def test_migration_destination_killed_before_loading_a_kv_snapshot(tmp_path: Path) -> None:
    run = _run(tmp_path, f"{DESTINATION}:before_import_kv:1")
    assert run.killed == [DESTINATION]
    assert run.fired == [f"{DESTINATION}.before_import_kv.1.fired"]
    _assert_every_sample_equals_its_unmoved_sibling(run)
    moved = [r for r in run.rollouts if r.migrations > 0]
    assert sorted(r.sample_id for r in moved) == sorted(run.moving)
    assert all(r.worker == DESTINATION for r in moved)
    # The snapshot is served once: the restarted destination's second pull finds it gone and
    # recomputes the moved prefix instead.
    assert run.stats.get("kv_fallbacks", 0.0) >= 1.0
    # The surviving source counted what it handed over: a few tokens each, as held.
    assert 0 < run.stats["migrated_tokens"] <= len(MOVING) * HOLD_STEP
