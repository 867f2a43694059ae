"""The fault-injection harness: a real local job, one role SIGKILLed at a named hook, restarted.

Where it sits: the fault tests (``tests/faults/test_*.py``) call :func:`run_job`. It starts a
tiny job exactly as ``rlhfspec run`` does (``local.run.LocalRun``: a real redis-server, real
worker processes, real vLLM on the tiny models), with ``RLHFSPEC_FAULT`` in the workers'
environment (``rlhfspec_workers.faults``). When a worker dies of SIGKILL the harness restarts
it the way a kubelet restarts a pod's container: the same command, the same environment
(fault variable included: the fault's marker on the job's storage keeps it from firing
again), the same storage, its log appended to. Any other non-zero exit fails the run.

Jobs are tiny and greedy (temperature 0, speculation off, one generation replica), so a
fault-free run and a recovered run must agree sample by sample: the tests compare the
trainer's own record of what it trained on (``trainer.trained_record``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfspec_api.manifest import RLHFJob, parse_rlhfjob
from rlhfspec_workers.coordinator.loop import load_dataset
from rlhfspec_workers.coordinator.tasks import iteration_tasks
from rlhfspec_workers.faults import ENV_VAR
from rlhfspec_workers.local.run import LocalRun, prepare_run_dir
from rlhfspec_workers.local.supervisor import WorkerProcess
from rlhfspec_workers.messages import Keys, Rollout
from rlhfspec_workers.preflight import preflight
from rlhfspec_workers.runtime import FIELD
from rlhfspec_workers.trainer.trained_record import read_trained_record

ITERATIONS, PROMPTS, SAMPLES = 3, 4, 2
JOB_TIMEOUT_SECONDS = 420.0
SIGKILLED = -9


def fault_job(name: str = "faults") -> RLHFJob:
    """Three iterations of 4 prompts x 2 greedy samples on the tiny kit: small enough for a
    2-core CI runner, big enough that every stage has work in flight when a hook fires."""
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
                "learningRate": 5.0e-5,
                "klCoef": 0.01,
                "microBatchSize": 8,
                "miniBatches": 2,
                "seed": 0,
            },
            "models": {"policy": {"path": "tiny://policy"}},
            "reward": {"type": "rule", "rule": "sort_digits"},
            "dataset": {"path": "tiny://dataset/train.jsonl"},
            "generation": {
                "replicas": 1,
                "maxNewTokens": 24,
                "temperature": 0.0,
                "speculative": {"mode": "off"},
                "reallocation": {"enabled": False},
            },
            # One rollout per reference forward: a batch pads its rows to the longest, which
            # moves reference log-probs by ~1e-7 with the batch's make-up (it follows arrival
            # timing), and Adam turns that into different weights two iterations later
            # (measured: 6e-4 on a later rollout's log-prob sum with batchSize 4).
            "inference": {"batchSize": 1},
            "trainer": {"checkpointEvery": 1},
            "storage": {"size": "1Gi"},
        },
    }
    return parse_rlhfjob(manifest)


@dataclass
class FaultRun:
    """What one job left behind, for the assertions."""

    run_dir: Path
    job: RLHFJob
    trained: dict[int, list[dict[str, Any]]]
    """iteration -> the trainer's record of the samples it trained on."""
    killed: list[str] = field(default_factory=list)
    """Workers that died of SIGKILL (and were restarted), in order."""
    stream_lengths: dict[str, int] = field(default_factory=dict)
    """Entries ever added to the task, rollout and experience streams (none is trimmed):
    more than the job's samples means a stage published something twice."""
    rollouts_at: dict[str, float] = field(default_factory=dict)
    """sample id -> when its rollout was published (Redis stream entry time, seconds)."""
    seconds: float = 0.0

    def log(self, worker: str) -> str:
        return (self.run_dir / "logs" / f"{worker}.log").read_text(errors="replace")

    def fired_at(self) -> float:
        """When the (one) fault fired: its marker's modification time."""
        (marker,) = (self.run_dir / "faults").glob("*.fired")
        return marker.stat().st_mtime

    def by_sample(self) -> dict[str, dict[str, Any]]:
        return {line["sample_id"]: line for lines in self.trained.values() for line in lines}


def expected_sample_ids(job: RLHFJob, run_dir: Path, iteration: int) -> list[str]:
    """The iteration's sample ids as the coordinator draws them (seeded, deterministic)."""
    splits = load_dataset(job, preflight(job.spec, storage_root=run_dir))
    return sorted(t.sample_id for t in iteration_tasks(job.spec, splits.train, iteration))


def _index(worker: WorkerProcess) -> int:
    return int(worker.name.rsplit("-", 1)[1])


def run_job(job: RLHFJob, run_dir: Path, fault: str | None) -> FaultRun:
    """Run ``job`` to the end with ``fault`` (``RLHFSPEC_FAULT``'s value, None for a fault-free
    run); restart SIGKILLed workers; fail on any other crash or after JOB_TIMEOUT_SECONDS."""
    saved = {name: os.environ.get(name) for name in (ENV_VAR, "RLHFSPEC_TASK_LEASE_MS")}
    if fault is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = fault
    # A restarted consumer takes back its own pending entries at once; a short lease only
    # matters if a task is stranded with another consumer (none is, with one per role).
    os.environ["RLHFSPEC_TASK_LEASE_MS"] = "3000"
    config = prepare_run_dir(run_dir, job, None, resume=False)
    local = LocalRun(job, run_dir, config, resume=False)
    started = time.monotonic()
    killed: list[str] = []
    keys = Keys(job.namespace or "default", job.name)
    lengths: dict[str, int] = {}
    rollouts_at: dict[str, float] = {}
    try:
        client, supervisor = local.start()
        handled: set[int] = set()
        while True:
            finished = False
            for worker, rc in supervisor.exited():
                if id(worker) in handled:
                    continue
                handled.add(id(worker))
                if rc == SIGKILLED:
                    killed.append(worker.name)
                    supervisor.start(worker.role, _index(worker))  # the kubelet's restart
                elif rc != 0:
                    raise AssertionError(
                        f"{worker.name} exited with {rc} (fault {fault}); its log:\n"
                        f"{worker.tail(40)}"
                    )
                elif worker.role == "coordinator":
                    finished = True
            if finished:
                for stream in ("tasks", "rollouts", "experience"):
                    lengths[stream] = int(client.xlen(getattr(keys, stream)))
                for entry_id, fields in client.xrange(keys.rollouts):
                    rollout = Rollout.from_bytes(fields[FIELD])
                    rollouts_at[rollout.sample_id] = int(entry_id.split(b"-")[0]) / 1000
                break
            if time.monotonic() - started > JOB_TIMEOUT_SECONDS:
                tails = "\n".join(f"--- {w.name}\n{w.tail(15)}" for w in supervisor.workers)
                raise AssertionError(f"job with fault {fault} timed out; worker logs:\n{tails}")
            time.sleep(0.2)
    finally:
        local.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    seconds = time.monotonic() - started
    trained = {i: read_trained_record(run_dir, i) for i in range(1, ITERATIONS + 1)}
    return FaultRun(run_dir, job, trained, killed, lengths, rollouts_at, seconds)
