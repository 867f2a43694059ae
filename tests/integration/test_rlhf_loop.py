"""The whole loop on the tiny models, as local mode runs it: real processes, Redis, vLLM.

One GRPO run (two generation workers) carries two faults on purpose: the trainer is killed
while it holds iteration 2's experiences (it must resume from checkpoint 1 and train 2 once),
and a generation worker is killed mid-iteration 3 (its samples must be reclaimed and finished
by the other). The tests then check, on that one recorded run: every iteration exactly once
with every sample, reward raised by a margin noise would not give, the resume and the reclaim.
A small PPO run checks the critic path end to end.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhfspec_api.manifest import RLHFJob, parse_rlhfjob
from rlhfspec_workers.local.run import LocalRun, prepare_run_dir
from rlhfspec_workers.local.supervisor import Supervisor
from rlhfspec_workers.messages import FIELD, Keys, SampleTask, WeightsPublished

pytestmark = pytest.mark.timeout(1800)

PROMPTS, SAMPLES, ITERATIONS = 32, 8, 4
PER_ITERATION = PROMPTS * SAMPLES


def _job(name: str, spec_overrides: dict[str, Any]) -> RLHFJob:
    manifest: dict[str, Any] = {
        "apiVersion": "rlhfspec.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": name},
        "spec": {
            "algorithm": {
                "name": "grpo",
                "iterations": ITERATIONS,
                "promptsPerIteration": PROMPTS,
                "samplesPerPrompt": SAMPLES,
                "learningRate": 3.0e-5,
                "klCoef": 0.01,
                "microBatchSize": 64,
                "miniBatches": 8,
            },
            "models": {"policy": {"path": "tiny://policy"}},
            "reward": {"type": "rule", "rule": "sort_digits"},
            "dataset": {"path": "tiny://dataset/train.jsonl"},
            "generation": {
                "replicas": 2,
                "maxNewTokens": 40,
                "speculative": {
                    "mode": "fixed",
                    "numDraftTokens": 4,
                    "drafters": [{"method": "draft_model", "model": {"path": "tiny://draft"}}],
                },
            },
            "trainer": {"checkpointEvery": 1},
            "storage": {"size": "1Gi"},
        },
    }
    for path, value in spec_overrides.items():
        node = manifest["spec"]
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_rlhfjob(manifest)


def _wait(what: str, condition: Callable[[], bool], supervisor: Supervisor, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        crashed = [(w.name, rc) for w, rc in supervisor.exited() if rc not in (0, -9)]
        if crashed:
            name = crashed[0][0]
            tail = next(w.tail(40) for w in supervisor.workers if w.name == name)
            raise AssertionError(f"{what}: {crashed} exited; log of {name}:\n{tail}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {w.name}\n{w.tail(15)}" for w in supervisor.workers)
            raise AssertionError(f"timed out waiting for {what}; worker logs:\n{tails}")
        time.sleep(0.2)


@dataclass
class RecordedRun:
    run_dir: Path
    metrics: list[dict[str, Any]]
    trainer_logs: str
    reclaimed_from_killed_worker: int
    done_counts: dict[int, int]


@pytest.fixture(scope="module")
def faulty_grpo_run(
    tiny_kit: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RecordedRun]:
    import os

    os.environ["RLHFSPEC_TASK_LEASE_MS"] = "3000"  # reclaim quickly (inherited by workers)
    run_dir = tmp_path_factory.mktemp("grpo-run")
    job = _job("loop-grpo", {})
    config = prepare_run_dir(run_dir, job, None, resume=False)
    local = LocalRun(job, run_dir, config, resume=False)
    try:
        bus, supervisor = local.start()
        client = bus.redis  # the test inspects Redis past the bus
        keys = Keys("default", job.name)

        def weights_iteration() -> int:
            raw = client.get(keys.weights)
            return WeightsPublished.from_bytes(raw).iteration if raw else 0

        def trainer_pending() -> int:
            info = client.xpending(keys.experience, Keys.TRAINER_GROUP)
            return int(info["pending"])

        # Fault 1: the trainer holds (unacked) iteration 2 experiences and has not published.
        _wait(
            "trainer holding iteration 2",
            lambda: weights_iteration() == 1 and trainer_pending() >= PER_ITERATION // 2,
            supervisor,
            900,
        )
        trainer = next(w for w in supervisor.workers if w.name == "trainer-0")
        trainer.process.send_signal(signal.SIGKILL)
        trainer.process.wait()
        supervisor.start("trainer")

        # Fault 2: a generation worker dies mid-iteration 3 with samples in flight. A whole
        # iteration's generation can take under a second here, shorter than a heartbeat, so
        # the worker is frozen first and killed only if, frozen, it still holds iteration 3
        # tasks it has not acked (a heartbeat's "running" can already be the next iteration's).
        victim = next(w for w in supervisor.workers if w.name == "generation-1")

        def frozen_holding_iteration_3() -> bool:
            if _held(client, keys, "generation-1", 3) == 0:
                return False
            victim.process.send_signal(signal.SIGSTOP)
            if _held(client, keys, "generation-1", 3) > 0:
                return True
            victim.process.send_signal(signal.SIGCONT)
            return False

        _wait("generation worker holding iteration 3", frozen_holding_iteration_3, supervisor, 900)
        in_flight = _held(client, keys, "generation-1", 3)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()

        coordinator = supervisor.workers[0]
        _wait("the job to finish", lambda: coordinator.process.poll() is not None, supervisor, 900)
        assert coordinator.process.returncode == 0, coordinator.tail(40)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        done = {i: int(client.scard(keys.done_samples(i))) for i in range(1, ITERATIONS + 1)}
        # Both trainer processes append to the same log file (as one pod's restarts would).
        trainer_logs = (run_dir / "logs" / "trainer-0.log").read_text()
        yield RecordedRun(
            run_dir, [json.loads(line) for line in lines], trainer_logs, in_flight, done
        )
    finally:
        local.stop()
        os.environ.pop("RLHFSPEC_TASK_LEASE_MS", None)


def _held(client: Any, keys: Keys, worker: str, iteration: int) -> int:
    """Tasks of ``iteration`` that ``worker`` was given on the shared stream and has not acked
    (what another worker reclaims once the lease runs out)."""
    pending = client.xpending_range(
        keys.tasks, Keys.GENERATION_GROUP, min="-", max="+", count=10_000, consumername=worker
    )
    held = 0
    for entry in pending:
        entry_id = entry["message_id"]
        for _, fields in client.xrange(keys.tasks, min=entry_id, max=entry_id):
            held += SampleTask.from_bytes(fields[FIELD]).iteration == iteration
    return held


def test_every_iteration_runs_exactly_once_with_every_sample(faulty_grpo_run: RecordedRun) -> None:
    metrics = faulty_grpo_run.metrics
    assert [m["iteration"] for m in metrics] == list(range(1, ITERATIONS + 1))
    assert all(m["samples"] == PER_ITERATION for m in metrics)
    assert faulty_grpo_run.done_counts == dict.fromkeys(range(1, ITERATIONS + 1), PER_ITERATION)
    assert [m["weight_version"] for m in metrics] == list(range(1, ITERATIONS + 1))
    for m in metrics:
        assert m["tokens"] > 0 and m["tokens_per_second"] > 0
        # fixed mode, draft model: vLLM verified drafts, so sequences advanced > 1 token/step
        assert m["mean_accepted_length"] > 1.2
        assert set(m["stage_seconds"]) >= {"generation", "inference", "training", "sync"}


def test_trainer_killed_mid_iteration_resumes_from_its_checkpoint(
    faulty_grpo_run: RecordedRun,
) -> None:
    logs = faulty_grpo_run.trainer_logs
    assert "resumed from checkpoint 1" in logs
    trained = [int(line.split()[3]) for line in logs.splitlines() if " trained on " in line]
    assert trained == list(range(1, ITERATIONS + 1)), trained  # none repeated, none skipped
    checkpoints = sorted(p.name for p in (faulty_grpo_run.run_dir / "checkpoints").iterdir())
    assert checkpoints[-1].endswith(str(ITERATIONS)), checkpoints


def test_killed_generation_worker_samples_are_reclaimed(faulty_grpo_run: RecordedRun) -> None:
    assert faulty_grpo_run.reclaimed_from_killed_worker > 0
    third = faulty_grpo_run.metrics[2]
    assert third["reclaimed"] >= 1
    assert third["samples"] == PER_ITERATION


def test_grpo_raises_the_policys_accuracy(faulty_grpo_run: RecordedRun, tiny_kit: Path) -> None:
    """Expected temperature-1 accuracy on 512 fixed prompts, computed exactly by teacher
    forcing (evaluate.expected_accuracy): no sampling noise, so the margin is the weights'.

    Measured with the trainer offline on this setup (4 iterations x 256 samples, lr 3e-5):
    +0.069 with the rule reward, -0.040 with the rewards shuffled (what noise does)."""
    import torch

    from rlhfspec_workers.tinymodels.evaluate import expected_accuracy
    from rlhfspec_workers.tinymodels.task import make_examples
    from rlhfspec_workers.torch_models import load_causal_lm

    examples = make_examples(512, seed=2024)
    cpu = torch.device("cpu")
    before = expected_accuracy(load_causal_lm(tiny_kit / "policy", cpu), examples)
    final = faulty_grpo_run.run_dir / "weights" / f"v{ITERATIONS}"
    after = expected_accuracy(load_causal_lm(final, cpu), examples)
    assert after - before >= 0.03, (before, after)


def test_ppo_with_a_critic_runs_end_to_end(tiny_kit: Path, tmp_path: Path) -> None:
    job = _job(
        "loop-ppo",
        {
            "algorithm.name": "ppo",
            "algorithm.iterations": 2,
            "algorithm.promptsPerIteration": 8,
            "algorithm.samplesPerPrompt": 4,
            "algorithm.microBatchSize": 16,
            "models.critic": {"path": "tiny://reward"},
            "models.reward": {"path": "tiny://reward"},
            "reward": {"type": "model"},
            "generation.replicas": 1,
        },
    )
    config = prepare_run_dir(tmp_path, job, None, resume=False)
    local = LocalRun(job, tmp_path, config, resume=False)
    try:
        assert local.run() == 0
    finally:
        local.stop()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    for r in records:
        assert r["value_loss"] is not None and r["value_loss"] == r["value_loss"]  # finite
        assert r["samples"] == 32


def test_local_run_rejects_bad_input_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlhfspec_workers.local.run import main

    manifest = _job("bad-input", {}).to_manifest()
    manifest["spec"]["models"]["policy"]["path"] = str(tmp_path / "missing-model")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    run_dir = tmp_path / "run"
    assert main([str(path), "--run-dir", str(run_dir)]) == 1
    assert "spec.models.policy" in capsys.readouterr().err
    assert not (run_dir / "redis").exists() and not (run_dir / "logs").exists()
