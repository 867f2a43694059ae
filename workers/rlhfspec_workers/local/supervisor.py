"""Local mode's process supervisor: the job's worker processes, as a kubelet would run them.

Where it sits: ``local.run`` asks it to start ``rlhfspec worker ROLE`` for the coordinator,
every generation replica, inference and trainer, each with the same environment contract the
operator gives pods (``runtime.WorkerEnv``) and its output in ``RUN_DIR/logs/<worker>.log``.
It reports which processes exited and how, and stops them all (SIGTERM, then SIGKILL after a
grace period) on completion, failure or Ctrl-C, so no half-started process is left behind.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO


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
        )
        worker = WorkerProcess(name, role, process, log_path, log)
        self.workers.append(worker)
        return worker

    def exited(self) -> list[tuple[WorkerProcess, int]]:
        return [(w, rc) for w in self.workers if (rc := w.process.poll()) is not None]

    def stop(self, grace_seconds: float = 15.0) -> None:
        """SIGTERM every live worker, wait, then SIGKILL what is left."""
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
