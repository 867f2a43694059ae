"""Helpers of the fault tests that run a real ``rlhfspec run`` job and kill parts of it.

A tiny job (4 prompts x 2 samples per iteration, 24 new tokens) on the tiny models; its
processes are found through ``/proc`` (redis-server by its config file, workers by their
``RLHFSPEC_STORAGE``), so a test can SIGKILL exactly the processes of its own run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
import yaml

from rlhfspec_workers.local.resume import previous_run_processes

ROOT = Path(__file__).resolve().parents[2]
PROMPTS, SAMPLES = 4, 2
SAMPLES_PER_ITERATION = PROMPTS * SAMPLES


def write_job(tmp_path: Path, iterations: int, name: str = "job.yaml") -> Path:
    job = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    job["spec"]["algorithm"].update(
        iterations=iterations,
        promptsPerIteration=PROMPTS,
        samplesPerPrompt=SAMPLES,
        microBatchSize=8,
    )
    job["spec"]["generation"].update(maxNewTokens=24)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job))
    return path


def start_run(manifest: Path, run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``rlhfspec run`` in its own process group (its workers start their own sessions)."""
    command = [str(ROOT / ".venv" / "bin" / "rlhfspec"), "run", str(manifest)]
    return subprocess.Popen(
        [*command, "--run-dir", str(run_dir), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _argv(pid: str) -> list[bytes]:
    try:
        return (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _environ(pid: str) -> list[bytes]:
    try:
        return (Path("/proc") / pid / "environ").read_bytes().split(b"\0")
    except OSError:
        return []


def redis_pid(run_dir: Path) -> int | None:
    """The run's redis-server: it renames its process title, but works in its data dir."""
    data_dir = str(run_dir / "redis")
    for entry in Path("/proc").iterdir():
        argv = _argv(entry.name) if entry.name.isdigit() else []
        if not argv or b"redis-server" not in argv[0]:
            continue
        try:
            if os.readlink(entry / "cwd") == data_dir:
                return int(entry.name)
        except OSError:
            continue
    return None


def worker_pids(run_dir: Path) -> list[int]:
    """Processes started with this run's storage in their environment (workers and their
    helpers, e.g. vLLM engine cores)."""
    marker = f"RLHFSPEC_STORAGE={run_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        mine = entry.name == str(os.getpid())
        if entry.name.isdigit() and not mine and marker in _environ(entry.name):
            pids.append(int(entry.name))
    return pids


def kill_run(job: subprocess.Popen[bytes], run_dir: Path) -> None:
    """SIGKILL the supervisor's process group, every worker and Redis: a machine crash."""
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    for pid in [*worker_pids(run_dir), redis_pid(run_dir)]:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # Gone for good (what `rlhfspec run` checks before it starts in this run dir again).
    wait_for(lambda: not previous_run_processes(run_dir), 30, "the killed processes to exit")


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    job: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``predicate``; fail at ``timeout``, or at once (with its output) when ``job``
    exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if job is not None and job.poll() is not None:
            output = job.stdout.read().decode(errors="replace") if job.stdout else ""
            raise AssertionError(f"the job exited ({job.returncode}) before {what}: {output}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def trained_lines(run_dir: Path) -> list[str]:
    """The trainer's "iteration N trained on S samples" lines (one per training it did)."""
    log = run_dir / "logs" / "trainer-0.log"
    if not log.exists():
        return []
    text = log.read_text(errors="replace")
    return [line for line in text.splitlines() if "trainer: iteration" in line]


def trained_iterations(run_dir: Path) -> list[tuple[int, int]]:
    """(iteration, samples) of every training the trainer logged, in order."""
    found = []
    for line in trained_lines(run_dir):
        words = line.split()
        at = words.index("iteration")
        found.append((int(words[at + 1]), int(words[at + 4])))
    return found


def redis_client(run_dir: Path) -> redis.Redis:
    """A client of the run's Redis (port from its redis.conf, its generated password)."""
    config = (run_dir / "redis" / "redis.conf").read_text()
    port = next(int(line.split()[1]) for line in config.splitlines() if line.startswith("port "))
    password = (run_dir / "redis" / "password").read_text().strip()
    return redis.Redis(port=port, password=password, socket_timeout=5)


def mount_tmpfs(path: Path, size: str) -> None:
    """A real small filesystem (root can mount tmpfs; the tests run as root here)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def unmount(path: Path) -> None:
    if path.is_mount():
        subprocess.run(["umount", "-l", str(path)], check=True)
