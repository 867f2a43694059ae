"""``rlhfspec bench chaos``: a tiny job under random SIGKILLs across every role, checked sample by
sample: nothing lost, nothing trained twice.

Where it sits: a soak, not in CI (minutes of real vLLM, trainer and redis-server on the tiny
models). It also holds the part the fault tests share (``tests/faults/fault_harness.py``):
:func:`run_restarting` runs a job as ``rlhfspec run`` does (``local.run.LocalRun``: a real
redis-server and real worker processes) and restarts what dies of SIGKILL the way a cluster
does: a worker with the same command, environment and storage, its log appended to (a
kubelet restarting the pod's container); redis-server on the same port, password and AOF, the
AOF check first (the managed Redis pod restarting on its claim). Any other non-zero exit fails
the run, unless the caller names its code (the Redis partition test restarts workers that exit
:data:`REDIS_UNREACHABLE`). With a :class:`ChaosMonkey` it SIGKILLs a random process of the
chosen roles every ``--kill-every`` seconds (jittered, seeded). At the end it reads what the
trainer trained on (``<storage>/trained/iter-N.jsonl``) against the sample ids the coordinator
draws for each iteration: samples lost and duplicated must both be 0.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfspec_api.manifest import RLHFJob, parse_rlhfjob
from rlhfspec_workers.coordinator.loop import load_dataset
from rlhfspec_workers.coordinator.tasks import iteration_tasks
from rlhfspec_workers.faults import ENV_VAR as FAULT_ENV_VAR
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.local.run import LocalRun, prepare_run_dir
from rlhfspec_workers.local.supervisor import Supervisor, WorkerProcess
from rlhfspec_workers.messages import IterationMetrics, Keys, Rollout
from rlhfspec_workers.preflight import preflight
from rlhfspec_workers.runtime import Bus
from rlhfspec_workers.trainer.trained_record import read_trained_record

ROLES = ("generation", "inference", "trainer", "coordinator", "redis")
PROMPTS, SAMPLES = 4, 2
SIGKILLED = -9
REDIS_UNREACHABLE = 3
"""``rlhfspec worker``'s exit code when Redis stayed unreachable past the retry limit
(``redis_retry``): the pod is restarted and rejoins once Redis answers."""


def tiny_greedy_job(name: str, iterations: int) -> RLHFJob:
    """``iterations`` of 4 prompts x 2 greedy samples on the tiny kit: small enough for a
    2-core machine, big enough that every stage has work in flight when a process dies."""
    manifest: dict[str, Any] = {
        "apiVersion": "rlhfspec.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": name},
        "spec": {
            "algorithm": {
                "name": "grpo",
                "iterations": iterations,
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


def expected_sample_ids(job: RLHFJob, run_dir: Path, iteration: int) -> list[str]:
    """The iteration's sample ids as the coordinator draws them (seeded, deterministic)."""
    splits = load_dataset(job, preflight(job.spec, storage_root=run_dir))
    return sorted(t.sample_id for t in iteration_tasks(job.spec, splits.train, iteration))


@dataclass
class JobRun:
    """What one job left behind."""

    run_dir: Path
    job: RLHFJob
    trained: dict[int, list[dict[str, Any]]]
    """iteration -> the trainer's record of the samples it trained on (absent: none)."""
    killed: list[str] = field(default_factory=list)
    """Processes that died of SIGKILL and were restarted, in order (``redis`` for Redis)."""
    stream_lengths: dict[str, int] = field(default_factory=dict)
    """Entries ever added to the task, rollout and experience streams (none is trimmed)."""
    rollouts_at: dict[str, float] = field(default_factory=dict)
    """sample id -> when its rollout was published (Redis stream entry time, seconds)."""
    metrics_rows: list[int] = field(default_factory=list)
    """The iteration of every row in the coordinator's metrics stream, in order."""
    restarted_at: list[tuple[str, float]] = field(default_factory=list)
    """(worker, wall time) of every worker restart."""
    exits: list[tuple[str, int]] = field(default_factory=list)
    """(worker, exit code) of every worker death that was restarted, in order (SIGKILL: -9)."""
    seconds: float = 0.0

    def log(self, worker: str) -> str:
        return (self.run_dir / "logs" / f"{worker}.log").read_text(errors="replace")

    def fired_at(self) -> float:
        """When the (one) fault fired: its marker's modification time."""
        (marker,) = (self.run_dir / "faults").glob("*.fired")
        return marker.stat().st_mtime

    def by_sample(self) -> dict[str, dict[str, Any]]:
        return {line["sample_id"]: line for lines in self.trained.values() for line in lines}


Chaos = Callable[[Supervisor, RedisServer], None]
"""Called every poll of :func:`run_restarting` (e.g. a :class:`ChaosMonkey`)."""


@dataclass
class ChaosMonkey:
    """SIGKILLs one live process of a random role in ``roles`` every ``kill_every`` seconds
    (each gap drawn from 0.5-1.5x, seeded): a node lost, an OOM kill, a preempted VM."""

    roles: Sequence[str]
    kill_every: float
    rng: random.Random
    kills: Counter[str] = field(default_factory=Counter)
    _next_at: float | None = None

    def __call__(self, supervisor: Supervisor, redis_server: RedisServer) -> None:
        now = time.monotonic()
        if self._next_at is None:
            self._next_at = now + self.kill_every * self.rng.uniform(0.5, 1.5)
        if now < self._next_at:
            return
        self._next_at = now + self.kill_every * self.rng.uniform(0.5, 1.5)
        role = self.rng.choice(list(self.roles))
        if role == "redis":
            process = redis_server.process
            pids = [process.pid] if process is not None and process.poll() is None else []
            name = "redis"
        else:
            live = [w for w in supervisor.workers if w.role == role and w.process.poll() is None]
            victim = self.rng.choice(live) if live else None
            pids, name = ([victim.process.pid], victim.name) if victim else ([], role)
        if not pids:
            return  # between its death and its restart: the next tick picks again
        os.kill(pids[0], signal.SIGKILL)
        self.kills[role] += 1
        print(f"[chaos] t={now:.0f} SIGKILL {name} (pid {pids[0]})", flush=True)


def _index(worker: WorkerProcess) -> int:
    return int(worker.name.rsplit("-", 1)[1])


def _collect(run: JobRun, bus: Bus, keys: Keys) -> None:
    """Stream lengths, rollout times and metrics rows, read from Redis at the end (a rollout
    that does not decode has no time: its sample counts as lost)."""
    for stream in ("tasks", "rollouts", "experience"):
        run.stream_lengths[stream] = bus.stream_length(getattr(keys, stream))
    for entry_id, rollout in bus.history(keys.rollouts, Rollout):
        run.rollouts_at[rollout.sample_id] = int(entry_id.split("-")[0]) / 1000
    for _, row in bus.history(keys.metrics_stream, IterationMetrics):
        run.metrics_rows.append(row.iteration)


def run_restarting(
    job: RLHFJob,
    run_dir: Path,
    *,
    fault: str | None = None,
    timeout: float = 420.0,
    chaos: Chaos | None = None,
    restart_delay: float = 0.0,
    restart_codes: Collection[int] = (SIGKILLED,),
) -> JobRun:
    """Run ``job`` to the end (``fault``: ``RLHFSPEC_FAULT``'s value, None for none); restart
    whatever dies of SIGKILL (a worker also when it exits with another code in
    ``restart_codes``), a worker ``restart_delay`` s after its death (a kubelet's crash-loop
    back-off starts at 10 s); AssertionError on any other crash or after ``timeout`` s."""
    saved = {name: os.environ.get(name) for name in (FAULT_ENV_VAR, "RLHFSPEC_TASK_LEASE_MS")}
    if fault is None:
        os.environ.pop(FAULT_ENV_VAR, None)
    else:
        os.environ[FAULT_ENV_VAR] = fault
    # A restarted consumer takes back its own pending entries at once; a short lease only
    # matters if a task is stranded with another consumer (none is, with one per role).
    os.environ["RLHFSPEC_TASK_LEASE_MS"] = "3000"
    config = prepare_run_dir(run_dir, job, None, resume=False)
    local = LocalRun(job, run_dir, config, resume=False)
    run = JobRun(run_dir, job, {})
    started = time.monotonic()
    keys = Keys(job.namespace or "default", job.name)
    try:
        bus, supervisor = local.start()
        handled: set[int] = set()
        pending: list[tuple[float, WorkerProcess]] = []
        while True:
            for due, worker in [p for p in pending if p[0] <= time.monotonic()]:
                pending.remove((due, worker))
                supervisor.start(worker.role, _index(worker))  # the kubelet's restart
                run.restarted_at.append((worker.name, time.time()))
            finished = False
            redis_process = local.redis_server.process
            redis_rc = redis_process.poll() if redis_process is not None else None
            if redis_rc is not None:
                if redis_rc != SIGKILLED:
                    raise AssertionError(f"redis-server exited with {redis_rc} (fault {fault})")
                run.killed.append("redis")
                local.redis_server.restart()  # the AOF check first; it raises if it refuses
            for worker, rc in supervisor.exited():
                if id(worker) in handled:
                    continue
                handled.add(id(worker))
                if rc == SIGKILLED or rc in restart_codes:
                    if rc == SIGKILLED:
                        run.killed.append(worker.name)
                    run.exits.append((worker.name, rc))
                    pending.append((time.monotonic() + restart_delay, worker))
                elif rc != 0:
                    raise AssertionError(
                        f"{worker.name} exited with {rc} (fault {fault}); its log:\n"
                        f"{worker.tail(40)}"
                    )
                elif worker.role == "coordinator":
                    finished = True
            if finished:
                _collect(run, bus, keys)
                break
            if time.monotonic() - started > timeout:
                tails = "\n".join(f"--- {w.name}\n{w.tail(15)}" for w in supervisor.workers)
                raise AssertionError(f"job (fault {fault}) timed out; worker logs:\n{tails}")
            if chaos is not None:
                chaos(supervisor, local.redis_server)
            time.sleep(0.2)
    finally:
        local.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    run.seconds = time.monotonic() - started
    for iteration in range(1, job.spec.algorithm.iterations + 1):
        try:
            run.trained[iteration] = read_trained_record(run_dir, iteration)
        except FileNotFoundError:
            continue
    return run


@dataclass(frozen=True)
class Tally:
    """What the trainer's record says against the coordinator's draw."""

    iterations_completed: int
    lost: int
    duplicated: int
    unexpected: int


def tally(run: JobRun) -> Tally:
    lost = duplicated = unexpected = 0
    for iteration in range(1, run.job.spec.algorithm.iterations + 1):
        ids = [line["sample_id"] for line in run.trained.get(iteration, [])]
        expected = set(expected_sample_ids(run.job, run.run_dir, iteration))
        lost += len(expected - set(ids))
        duplicated += len(ids) - len(set(ids))
        unexpected += len(set(ids) - expected)
    return Tally(len(run.trained), lost, duplicated, unexpected)


def report(run: JobRun, monkey: ChaosMonkey, total: int) -> list[str]:
    counts = tally(run)
    restarts = Counter(name if name == "redis" else name.rsplit("-", 1)[0] for name in run.killed)
    per_role = ", ".join(f"{role} {monkey.kills[role]}" for role in ROLES if role in monkey.roles)
    rows = Counter(run.metrics_rows)
    return [
        f"iterations completed: {counts.iterations_completed}/{total}",
        f"kills survived: {sum(restarts.values())} ({per_role})",
        f"samples lost: {counts.lost}",
        f"samples duplicated: {counts.duplicated}",
        f"samples trained that were never drawn: {counts.unexpected}",
        f"samples expected: {total * PROMPTS * SAMPLES}, trained: "
        f"{sum(len(lines) for lines in run.trained.values())}",
        f"metrics rows: {len(run.metrics_rows)} for {len(rows)} iterations "
        f"(missing {sorted(set(range(1, total + 1)) - set(rows))}, "
        f"twice {sorted(i for i, n in rows.items() if n > 1)})",
        f"stream entries (tasks, rollouts, experiences): {run.stream_lengths}",
        f"wall time: {run.seconds:.0f}s",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhfspec bench chaos", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--iterations", type=int, default=20, help="job iterations (default 20)")
    parser.add_argument("--kill-every", type=float, default=8.0,
                        help="mean seconds between kills (default 8)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill schedule")
    parser.add_argument("--roles", default=",".join(ROLES),
                        help="comma-separated roles to kill (default: all)")  # fmt: skip
    parser.add_argument("--run-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    args = parser.parse_args(argv)
    roles = tuple(r for r in args.roles.split(",") if r)
    wrong = [r for r in roles if r not in ROLES]
    if wrong or not roles:
        named = ",".join(wrong) or "nothing"
        parser.error(f"--roles: {named} is not allowed (any of {', '.join(ROLES)})")
    if args.iterations < 1:
        parser.error(f"--iterations: {args.iterations} is not allowed (>= 1)")
    if args.kill_every <= 0:
        parser.error(f"--kill-every: {args.kill_every} is not allowed (> 0 seconds)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_dir = (args.run_dir or Path(tempfile.mkdtemp(prefix="rlhfspec-chaos-"))).resolve()
    monkey = ChaosMonkey(roles, args.kill_every, random.Random(args.seed))
    print(f"[chaos] {args.iterations} iterations, a SIGKILL every ~{args.kill_every:g}s across "
          f"{', '.join(roles)} (seed {args.seed}); run dir {run_dir}", flush=True)  # fmt: skip
    try:
        run = run_restarting(
            tiny_greedy_job("chaos", args.iterations), run_dir, timeout=args.timeout, chaos=monkey
        )
    except AssertionError as exc:
        print(f"[chaos] the job failed: {exc}", file=sys.stderr)
        return 1
    lines = report(run, monkey, args.iterations)
    print("\n".join(lines))
    counts = tally(run)
    clean = counts.lost == counts.duplicated == counts.unexpected == 0
    return 0 if clean and counts.iterations_completed == args.iterations else 1
