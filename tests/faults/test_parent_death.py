"""A SIGKILLed ``rlhfspec run`` takes its processes with it (issue 18; docs/faults.md).

The two mechanisms of ``local.supervisor`` one at a time, with real processes and no engine:
the workers' parent-death signal (``PR_SET_PDEATHSIG``), and the guard that ends every process
of the run (the redis-server ``local.run`` starts, anything that escaped the signal) once the
supervisor's process is gone, but stands down when the supervisor stopped cleanly. The whole
run killed this way: ``tests/integration/test_resume.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _parent(code: str, tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """A Python process running ``code`` (which prints its children's pids, then sleeps)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pids = [int(word) for word in parent.stdout.readline().split()]
    return parent, pids


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_worker_gets_sigterm_when_its_supervisor_is_sigkilled(tmp_path: Path) -> None:
    code = f"""
import subprocess, sys, time
from rlhfspec_workers.local.supervisor import die_with_parent
child = subprocess.Popen({SLEEPER!r}, start_new_session=True, preexec_fn=die_with_parent())
print(child.pid, flush=True)
time.sleep(120)
"""
    parent, (child,) = _parent(code, tmp_path)
    try:
        assert not _gone(child, 0.5)  # alive while its parent is
        parent.kill()
        parent.wait()
        assert _gone(child, 5), "the worker outlived its SIGKILLed supervisor"
    finally:
        _kill([parent.pid, child])


GUARDED = """
import os, subprocess, sys, time
from pathlib import Path
from rlhfspec_workers.local.supervisor import ParentDeathGuard
storage = Path(sys.argv[1])
guard = ParentDeathGuard(storage)
# A process of the run that no parent-death signal covers (as local mode's redis-server).
stray = subprocess.Popen({sleeper!r}, start_new_session=True,
                         env={{**os.environ, "RLHFSPEC_STORAGE": str(storage.resolve())}})
print(stray.pid, guard.process.pid, flush=True)
if {disarm}:
    guard.disarm()
    print("disarmed", flush=True)
time.sleep(120)
"""


def test_the_guard_ends_the_runs_processes_once_the_supervisor_is_sigkilled(
    tmp_path: Path,
) -> None:
    parent, (stray, guard) = _parent(GUARDED.format(sleeper=SLEEPER, disarm=False), tmp_path)
    try:
        assert not _gone(stray, 0.5) and not _gone(guard, 0.1)
        parent.kill()
        parent.wait()
        assert _gone(stray, 5), "the run's process outlived its SIGKILLed supervisor"
        assert _gone(guard, 5)
    finally:
        _kill([parent.pid, stray, guard])


def test_a_disarmed_guard_kills_nothing(tmp_path: Path) -> None:
    parent, (stray, guard) = _parent(GUARDED.format(sleeper=SLEEPER, disarm=True), tmp_path)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "disarmed"
        assert _gone(guard, 5)  # it exits at once
        parent.kill()
        parent.wait()
        assert not _gone(stray, 2), "a disarmed guard killed a process"
    finally:
        _kill([parent.pid, stray, guard])


STOPPING = """
import os, subprocess, sys, time
from pathlib import Path
from rlhfspec_workers.local.supervisor import Supervisor
storage = Path(sys.argv[1])
supervisor = Supervisor(storage, {{"RLHFSPEC_STORAGE": str(storage.resolve())}})
# The run's redis-server, which local.run stops after the workers (no parent-death signal).
redis = subprocess.Popen({sleeper!r}, start_new_session=True,
                         env={{**os.environ, "RLHFSPEC_STORAGE": str(storage.resolve())}})
supervisor.stop(disarm=False)  # the workers are stopped; Redis is being stopped ...
print(redis.pid, supervisor.guard.process.pid, flush=True)
time.sleep(120)  # ... when the supervisor is SIGKILLed
"""


def test_a_supervisor_killed_while_stopping_redis_still_takes_redis_down(tmp_path: Path) -> None:
    """``local.run`` keeps the guard armed until its redis-server has stopped too: a run killed
    between stopping its workers and stopping Redis leaves nothing behind."""
    parent, (redis, guard) = _parent(STOPPING.format(sleeper=SLEEPER), tmp_path)
    try:
        assert not _gone(redis, 0.5) and not _gone(guard, 0.1)  # still armed after stop()
        parent.kill()
        parent.wait()
        assert _gone(redis, 5), "redis-server outlived a supervisor killed while stopping it"
    finally:
        _kill([parent.pid, redis, guard])
