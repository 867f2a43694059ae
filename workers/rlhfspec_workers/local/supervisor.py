"""Local mode's process supervisor: the job's worker processes, as a kubelet would run them.

Where it sits: ``local.run`` asks it to start ``rlhfspec worker ROLE`` for the coordinator,
every generation replica, inference and trainer, each with the same environment contract the
operator gives pods (``runtime.WorkerEnv``) and its output in ``RUN_DIR/logs/<worker>.log``.
It reports which processes exited and how, and stops them all (SIGTERM, then SIGKILL after a
grace period) on completion, failure or Ctrl-C, so no half-started process is left behind.

A supervisor that is itself SIGKILLed cannot stop anything, so nothing depends on it doing so:
every worker asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, set in the
child before exec), and a small guard process (:func:`guard_main`, in a session of its own)
waits on a pipe only the supervisor's process holds. When that pipe closes without the
supervisor having stopped cleanly, the guard SIGTERMs, then SIGKILLs, every process of the run
still alive: the workers (and anything they started) by their ``RLHFSPEC_STORAGE``, and the
run's redis-server by its data directory (``local.resume.previous_run_processes``), which
``local.run`` starts outside this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1  # linux/prctl.h
GUARD_GRACE_SECONDS = 10.0
DISARM = b"disarm"


def local_worker_env(
    *,
    job: str,
    namespace: str,
    replicas: int,
    redis_port: int,
    redis_password: str,
    job_config: Path,
    storage: Path,
    kv_secret: str | None = None,
) -> dict[str, str]:
    """The pod environment contract (``runtime.WorkerEnv``) for workers run on this machine
    against a local redis-server; each binds a free metrics port and logs it. The job's KV key
    is new for every call (one per run) unless given: workers of another run, or any other
    local user's process, can neither pull this run's KV snapshots nor feed it theirs."""
    return {
        "RLHFSPEC_JOB": job,
        "RLHFSPEC_NAMESPACE": namespace,
        "RLHFSPEC_REPLICAS": str(replicas),
        "RLHFSPEC_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "RLHFSPEC_REDIS_PASSWORD": redis_password,
        "RLHFSPEC_JOB_CONFIG": str(job_config.resolve()),
        "RLHFSPEC_STORAGE": str(storage.resolve()),
        "RLHFSPEC_METRICS_PORT": "0",
        # Local mode reads models and data from this machine (a pod may not: preflight).
        "RLHFSPEC_LOCAL": "1",
        "RLHFSPEC_KV_SECRET": kv_secret or secrets.token_hex(32),
    }


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``); None where there is no such call. The kernel sends it when
    the *thread* that started the child exits, so workers are started from the main thread."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: no signal comes
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class ParentDeathGuard:
    """The guard process of one run (see the module docstring): :meth:`disarm` on a clean
    stop; any other end of this process (SIGKILL included) closes the pipe and fires it."""

    def __init__(self, storage: Path) -> None:
        read_end, self._write_end = os.pipe()  # both non-inheritable: workers never hold it
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLHFSPEC_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rlhfspec_workers.local.supervisor", str(storage.resolve()),
             str(read_end)],
            pass_fds=(read_end,),
            env=env,
            stdin=subprocess.DEVNULL,
            # Its own session: neither the terminal's Ctrl-C nor a kill of the supervisor's
            # process group reaches it.
            start_new_session=True,
        )  # fmt: skip
        os.close(read_end)

    def disarm(self) -> None:
        """The run stopped its processes itself: the guard exits without killing anything."""
        if self._write_end < 0:
            return
        with contextlib.suppress(OSError):  # the guard is gone already
            os.write(self._write_end, DISARM)
        os.close(self._write_end)
        self._write_end = -1
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def guard_main(argv: Sequence[str]) -> int:
    """The guard: block on the pipe; at EOF without DISARM, end the run's processes."""
    storage, fd = Path(argv[0]), int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    received = b""
    while chunk := os.read(fd, 64):
        received += chunk
    if received.startswith(DISARM):
        return 0
    from rlhfspec_workers.local.resume import previous_run_processes

    for pid in previous_run_processes(storage):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + GUARD_GRACE_SECONDS
    while (left := previous_run_processes(storage)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    return 0


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


@dataclass
class WorkerProcess:
    name: str
    role: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def tail(self, lines: int = 15) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    def __init__(self, run_dir: Path, base_env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.base_env = base_env
        self.workers: list[WorkerProcess] = []
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.guard = ParentDeathGuard(Path(base_env.get("RLHFSPEC_STORAGE", run_dir)))

    def start(self, role: str, index: int = 0) -> WorkerProcess:
        name = f"{role}-{index}"
        env = {
            **os.environ,
            **self.base_env,
            "RLHFSPEC_ROLE": role,
            "RLHFSPEC_WORKER_INDEX": str(index),
            "RLHFSPEC_POD_NAME": name,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONUNBUFFERED": "1",
        }
        log_path = self.run_dir / "logs" / f"{name}.log"
        log = log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "rlhfspec_cli", "worker", role],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own process group: Ctrl-C reaches the supervisor only, which stops workers in
            # order (a worker killed by the terminal's SIGINT mid-write is what we avoid).
            start_new_session=True,
            # ...but a supervisor killed outright takes them with it (SIGTERM: a clean stop).
            preexec_fn=die_with_parent(),
        )
        worker = WorkerProcess(name, role, process, log_path, log)
        self.workers.append(worker)
        return worker

    def exited(self) -> list[tuple[WorkerProcess, int]]:
        return [(w, rc) for w in self.workers if (rc := w.process.poll()) is not None]

    def stop(self, grace_seconds: float = 15.0, *, disarm: bool = True) -> None:
        """SIGTERM every live worker, wait, then SIGKILL what is left. ``disarm=False`` keeps
        the guard armed: the caller still has processes of the run to stop (its
        redis-server) and disarms it after them (``guard.disarm``), so a supervisor killed in
        between still takes them down."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for worker in self.workers:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                worker.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        for worker in self.workers:
            worker.log.close()
        if disarm:
            self.guard.disarm()


if __name__ == "__main__":
    raise SystemExit(guard_main(sys.argv[1:]))
