"""``rlhfspec run FILE``: run an RLHFJob manifest on this machine (local mode).

Where it sits: the README's main command. It parses the manifest once and runs preflight
(models, draft vocabularies, dataset rows: one message naming the field, before anything
starts), starts an embedded ``redis-server`` with a generated password, then the same worker
processes a cluster runs (``rlhfspec worker ROLE`` for the coordinator, each generation
replica, inference and trainer) with the pod environment contract. It prints one table row
per iteration (read from the coordinator's metrics stream through a ``runtime.Bus`` that does
not retry: the watcher restarts Redis itself) and a progress line, writes
``metrics.jsonl`` and the report's PNG plots into the run directory, and stops every process
on success, failure or Ctrl-C. ``--resume`` continues from the last checkpoint and the Redis
state kept in the run directory (``local.resume`` says which manifest changes it accepts). A
redis-server that dies mid-run is restarted on the same port, password and AOF. Workers
inherit the user's environment (installed packages, environment variables, PYTHONPATH with the
current directory first, as ``python -c`` has it), so a function reward importable in the
user's shell imports in the job; when a worker reports that the job cannot go on (a reward
that cannot score), its reason is printed first.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from rlhfspec_api.manifest import DocumentError, ManifestError, RLHFJob, load_rlhfjob
from rlhfspec_workers.faults import ENV_VAR as FAULT_ENV_VAR
from rlhfspec_workers.faults import HOLD_ENV_VAR, FaultSpecError, parse_fault
from rlhfspec_workers.local.redis_server import (
    RedisNotInstalledError,
    RedisServer,
    find_redis_server,
)
from rlhfspec_workers.local.resume import ResumeRefused, previous_run_processes, resume_changes
from rlhfspec_workers.local.supervisor import Supervisor, local_worker_env
from rlhfspec_workers.messages import (
    IterationMetrics,
    JobFailure,
    JobProgress,
    Keys,
    MessageError,
    StorageFull,
)
from rlhfspec_workers.preflight import PreflightError, preflight
from rlhfspec_workers.redis_retry import OUTAGE_ERRORS
from rlhfspec_workers.runtime import Bus, StreamCursor, StreamEntry, WorkerEnv

STATE = ("redis", "checkpoints", "weights", "drafts", "logs", "report", "metrics.jsonl", "job.yaml")
COLUMNS = (
    ("iter", 5), ("reward", 7), ("kl", 7), ("eval", 11), ("tok/s", 8), ("accept", 6),
    ("strategy", 18), ("migr", 4), ("gen s", 6), ("inf s", 6), ("train s", 7), ("sync s", 6),
    ("total s", 7),
)  # fmt: skip


def _fail(lines: Sequence[str]) -> int:
    for line in lines:
        print(line, file=sys.stderr)
    return 1


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _eval_cell(m: IterationMetrics) -> str:
    """Held-out accuracy after this iteration; the first row also shows the initial one."""
    after = "-" if m.eval_accuracy is None else f"{m.eval_accuracy:.3f}"
    if m.baseline_eval_accuracy is not None:
        return f"{m.baseline_eval_accuracy:.3f}>{after}"
    return after


def format_row(m: IterationMetrics) -> str:
    stages = m.stage_seconds
    strategy = max(m.strategies.items(), key=lambda kv: kv[1])[0] if m.strategies else "-"
    cells = [
        f"{m.iteration}/{m.total_iterations}",
        _cell(m.reward_mean, 3),
        _cell(m.kl, 4),
        _eval_cell(m),
        _cell(m.tokens_per_second, 1),
        _cell(m.mean_accepted_length, 2),
        strategy,
        str(m.migrations),
        *(_cell(stages.get(s), 1) for s in ("generation", "inference", "training", "sync")),
        _cell(stages.get("total"), 1),
    ]
    return " ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True))


def header() -> str:
    return " ".join(name.rjust(width) for name, width in COLUMNS)


def user_pythonpath(cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The workers' PYTHONPATH: the current directory first (what ``python -c`` puts on the
    path, so the user's own modules import), then the user's PYTHONPATH."""
    env = os.environ if environ is None else environ
    parts = [str(cwd or Path.cwd())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def run_manifest(job: RLHFJob, iterations: int | None) -> dict[str, Any]:
    """The manifest the workers read (``RUN_DIR/job.yaml``): the parsed job, defaults filled."""
    manifest: dict[str, Any] = job.to_manifest()
    if iterations is not None:
        manifest["spec"]["algorithm"]["iterations"] = iterations
    return manifest


def prepare_run_dir(run_dir: Path, job: RLHFJob, iterations: int | None, resume: bool) -> Path:
    """Fresh runs start from nothing; --resume keeps Redis, checkpoints and weights."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in STATE:
            path = run_dir / name
            if path.is_mount():  # a filesystem of its own mounted there: empty it, keep it
                for child in path.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    manifest = run_manifest(job, iterations)
    config = run_dir / "job.yaml"
    config.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return config


class Started(NamedTuple):
    """What :meth:`LocalRun.start` hands back: the watcher's bus and the workers' supervisor."""

    bus: Bus
    supervisor: Supervisor


class LocalRun:
    def __init__(self, job: RLHFJob, run_dir: Path, config: Path, resume: bool) -> None:
        self.job = job
        self.run_dir = run_dir
        self.config = config
        self.resume = resume
        self.keys = Keys(job.namespace, job.name)
        password_file = run_dir / "redis" / "password"
        if resume and password_file.exists():
            password = password_file.read_text().strip()
        else:
            password = secrets.token_hex(16)
        self.redis_server = RedisServer(run_dir / "redis", password=password)
        self.password = password
        self.supervisor: Supervisor | None = None
        self._storage_shown: str | None = None

    def run(self) -> int:
        bus, supervisor = self.start()
        return self._watch(bus, supervisor)

    def start(self) -> Started:
        """Start Redis and every worker process; returns the watcher's bus and the supervisor.

        The watcher reads the job's Redis as its coordinator does (same keys, no consumer
        group), without retries: it keeps the redis-server up itself, so an outage is its to
        wait out while it restarts the server, not to sleep through."""
        spec = self.job.spec
        self.redis_server.start()
        (self.run_dir / "redis" / "password").write_text(self.password + "\n")
        env = local_worker_env(
            job=self.job.name,
            namespace=self.job.namespace or "default",
            replicas=spec.generation.replicas,
            redis_port=self.redis_server.port,
            redis_password=self.password,
            job_config=self.config,
            storage=self.run_dir,
        )
        env["PYTHONPATH"] = user_pythonpath()
        bus = Bus(WorkerEnv.from_environ("coordinator", env), retry_seconds=0)
        bus.clear_stop_and_failure()
        supervisor = self.supervisor = Supervisor(self.run_dir, env)
        supervisor.start("coordinator")
        for index in range(spec.generation.replicas):
            supervisor.start("generation", index)
        supervisor.start("inference")
        supervisor.start("trainer")
        names = ", ".join(w.name for w in supervisor.workers)
        print(f"[rlhfspec] {self.job.name}: started {names} (logs in {self.run_dir / 'logs'})")
        return Started(bus, supervisor)

    def _watch(self, bus: Bus, supervisor: Supervisor) -> int:
        print(header())
        # Every row from the first: a resumed run prints the rows recorded before it too. A
        # row this version cannot read is dead-lettered (and said) by the bus.
        rows = StreamCursor(self.keys.metrics_stream, IterationMetrics)
        tty = sys.stdout.isatty()
        outage = False
        while True:
            entries: list[StreamEntry[IterationMetrics]] = []
            try:
                entries = bus.read_new(rows, block_ms=500)
            except OUTAGE_ERRORS as exc:
                # Redis restarting (its AOF keeps the state): the workers retry too; watch on.
                if not outage:
                    print(f"[rlhfspec] Redis unreachable ({exc}); waiting for it", flush=True)
                outage = True
                time.sleep(0.5)
            else:
                if outage:
                    print("[rlhfspec] Redis answers again", flush=True)
                outage = False
            for _, metrics in entries:
                if tty:
                    print("\r\033[K", end="")
                print(format_row(metrics), flush=True)
            if not outage:
                try:
                    if tty:
                        self._progress_line(bus)
                    self._storage_notice(bus)
                except OUTAGE_ERRORS:
                    outage = True  # went down since the read: said at the next read
            restart_failed = self._keep_redis_up()
            if restart_failed:
                return _fail([f"[rlhfspec] {self.job.name} failed: {restart_failed}"])
            exits = supervisor.exited()
            coordinator = next((rc for w, rc in exits if w.role == "coordinator"), None)
            failed = [(w, rc) for w, rc in exits if rc != 0]
            if failed:
                if tty:
                    print()
                lines = [f"[rlhfspec] {self.job.name} failed:"]
                reason = self._failure_reason(bus, supervisor)
                if reason:
                    lines[0] = f"[rlhfspec] {self.job.name} failed: {reason}"
                for worker, rc in failed:
                    lines.append(f"  {worker.name} exited with {rc}; last lines of its log:")
                    lines.extend(f"    {line}" for line in worker.tail().splitlines())
                return _fail(lines)
            if coordinator == 0:
                if tty:
                    print()
                return 0

    def _failure_reason(self, bus: Bus, supervisor: Supervisor) -> str | None:
        """The reason a worker reported (``Keys.failure``), after giving the coordinator a
        moment to record it in the job's progress and exit."""
        try:
            failure = bus.get(self.keys.failure, JobFailure)
        except MessageError as exc:
            reason: str | None = f"a worker reported a failure that cannot be read ({exc})"
        else:
            reason = None
            if failure is not None:
                reason = f"{failure.field}: {failure.reason} (reported by {failure.worker})"
        if reason is None:
            return None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not any(
            w.role == "coordinator" for w, _ in supervisor.exited()
        ):
            time.sleep(0.1)
        return reason

    def _keep_redis_up(self) -> str | None:
        """Restart a redis-server that died (a crash, the OOM killer) on the same port,
        password and data, its AOF checked first, as a cluster restarts the Redis pod: the
        workers ride out the gap with their retries. Returns why a restart failed, if it did."""
        process = self.redis_server.process
        if process is None or process.poll() is None:
            return None
        print(f"\n[rlhfspec] redis-server exited ({process.returncode}); restarting it",
              file=sys.stderr, flush=True)  # fmt: skip
        try:
            self.redis_server.restart()
        except RuntimeError as exc:  # the AOF check refused, or it did not come up
            return str(exc)
        check = self.redis_server.aof_check_report.splitlines()
        print(f"[rlhfspec] redis-server is back: {check[-1] if check else ''}",
              file=sys.stderr, flush=True)  # fmt: skip
        return None

    def _storage_notice(self, bus: Bus) -> None:
        """Say when the trainer reports StorageFull (it waits for room, the job stays up)
        and when its writes succeed again."""
        try:
            report = bus.get(self.keys.storage_full, StorageFull)
            text = None if report is None else report.message
        except MessageError as exc:
            text = f"storage full (unreadable report: {exc})"
        if text != self._storage_shown:
            line = f"StorageFull: {text}" if text else "storage has room again"
            print(f"\n[rlhfspec] {line}", flush=True)
            self._storage_shown = text

    def _progress_line(self, bus: Bus) -> None:
        try:
            progress = bus.get(self.keys.progress, JobProgress)
        except MessageError:
            return
        if progress is None:
            return
        total = max(progress.total_iterations, 1)
        filled = int(20 * progress.iteration / total)
        bar = "#" * filled + "-" * (20 - filled)
        print(f"\r\033[K[{bar}] {progress.message}"[:160], end="", flush=True)

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop(disarm=False)
        self.redis_server.stop()
        if self.supervisor is not None:  # killed before this line, the guard stops Redis too
            self.supervisor.guard.disarm()


def _report(run_dir: Path) -> None:
    from rlhfspec_workers.observability.report import ReportError, load_metrics, write_report

    path = run_dir / "metrics.jsonl"
    try:
        written = write_report(run_dir, load_metrics(path), str(path))
    except ReportError as exc:
        print(f"[rlhfspec] no report: {exc}", file=sys.stderr)
        return
    print(f"[rlhfspec] report: {', '.join(str(p) for p in written)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhfspec run", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where metrics, checkpoints, logs and Redis data go "
                        "(default runs/<job name>)")  # fmt: skip
    parser.add_argument("--iterations", type=int, default=None,
                        help="override spec.algorithm.iterations")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run directory's last checkpoint")  # fmt: skip
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        return _fail([f"--iterations: {args.iterations} is not allowed (>= 1)"])
    for variable in (FAULT_ENV_VAR, HOLD_ENV_VAR):
        if os.environ.get(variable, "").strip():
            try:  # test-only fault injection: refuse a hook that does not exist before any start
                parse_fault(os.environ[variable], variable)
            except FaultSpecError as exc:
                return _fail([str(exc)])
    try:
        job = load_rlhfjob(args.manifest)
    except DocumentError as exc:
        return _fail([str(exc)])
    except ManifestError as exc:
        return _fail([f"{args.manifest}: {error}" for error in exc.errors])
    # Absolute from here on: redis-server changes into its --dir before it opens --logfile, and
    # workers start in their own directories, so a relative run dir would name other places.
    run_dir: Path = (args.run_dir or Path("runs") / job.name).resolve()
    try:
        find_redis_server()
        preflight(job.spec, storage_root=run_dir)
    except RedisNotInstalledError as exc:
        return _fail([str(exc)])
    except PreflightError as exc:
        return _fail([f"{args.manifest}: {error}" for error in exc.errors])
    if args.resume and not (run_dir / "redis").is_dir():
        print(f"[rlhfspec] nothing to resume in {run_dir}: starting fresh")
    leftover = previous_run_processes(run_dir)
    if leftover:
        pids = " ".join(str(pid) for pid in leftover)
        return _fail([
            f"[rlhfspec] {run_dir}: processes of an earlier run are still running "
            f"(pids {pids}); they would train on the same samples and checkpoints. "
            f"Stop them (kill {pids}) and run again."
        ])  # fmt: skip
    if args.resume and (run_dir / "job.yaml").is_file():
        # The job the run dir holds, or refuse: a changed model, dataset or algorithm would
        # mix two jobs in one set of checkpoints, sample ids and Redis state.
        try:
            accepted = resume_changes(run_dir / "job.yaml", run_manifest(job, args.iterations))
        except ResumeRefused as exc:
            return _fail([f"[rlhfspec] {exc.lines[0]}", *exc.lines[1:]])
        if accepted:
            print("[rlhfspec] resuming with changed fields:", *accepted, sep="\n")
    config = prepare_run_dir(run_dir, job, args.iterations, args.resume)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    local = LocalRun(job, run_dir, config, args.resume)
    # SIGTERM as Ctrl-C: both unwind through the finally below (workers, then Redis).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    try:
        code = local.run()
    except KeyboardInterrupt:
        print("\n[rlhfspec] interrupted: stopping workers and Redis", file=sys.stderr)
        code = 130
    finally:
        local.stop()
    if code == 0:
        print(f"[rlhfspec] {job.name} succeeded in {time.monotonic() - started:.0f}s; "
              f"metrics in {run_dir / 'metrics.jsonl'}")  # fmt: skip
        _report(run_dir)
    elif code == 130:
        print(f"[rlhfspec] resume with: rlhfspec run {args.manifest} --run-dir {run_dir} "
              "--resume", file=sys.stderr)  # fmt: skip
    return code
