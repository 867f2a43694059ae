"""Redis out of reach for longer than the workers' retry limit: they exit 3, are restarted,
rejoin once Redis answers, and the job still trains every sample once.

A Redis call rides out an outage for ``redis_retry.RETRY_SECONDS`` (600 s), then raises
``RedisUnreachableError`` naming the limit; ``rlhfspec worker`` exits 3 with that line, and the
kubelet (here the fault harness) starts the worker again. ``RLHFSPEC_REDIS_RETRY_SECONDS``
shortens the limit for tests only; a bad value is refused when the worker starts.

The job test partitions Redis for real: once iteration 1 is trained it SIGSTOPs the
redis-server (connections stay open and time out; nothing is refused) for 40 s, far past the
shortened 5 s limit and the client's 30 s socket timeout, then SIGCONTs it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fault_harness import (
    ITERATIONS,
    PROMPTS,
    REDIS_UNREACHABLE,
    SAMPLES,
    expected_sample_ids,
    fault_job,
    run_job,
)

from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.local.supervisor import Supervisor
from rlhfspec_workers.redis_retry import (
    RETRY_SECONDS,
    RETRY_SECONDS_ENV,
    RedisUnreachableError,
    RetryLimitError,
    retry_seconds_from_environ,
    retrying,
)
from rlhfspec_workers.trainer.trained_record import record_path

ROOT = Path(__file__).resolve().parents[2]
LIMIT_SECONDS = 5
PARTITION_SECONDS = 40.0


def test_the_limit_is_600_s_unless_the_test_variable_sets_it() -> None:
    assert retry_seconds_from_environ({}) == RETRY_SECONDS == 600.0
    assert retry_seconds_from_environ({RETRY_SECONDS_ENV: "2.5"}) == 2.5
    for bad in ("0", "-5", "ten", "", "inf", "nan"):
        with pytest.raises(RetryLimitError, match=f"{RETRY_SECONDS_ENV}='{bad}': expected"):
            retry_seconds_from_environ({RETRY_SECONDS_ENV: bad})


def test_an_outage_past_the_limit_raises_naming_the_limit() -> None:
    import redis

    def down() -> None:
        raise redis.ConnectionError("Connection refused")

    started = time.monotonic()
    with pytest.raises(RedisUnreachableError, match=r"past the retry limit of 0.5s") as raised:
        retrying(down, what="read tasks", deadline_seconds=0.5, on_retry=lambda _: None)
    assert time.monotonic() - started < 2.0
    assert "during read tasks" in str(raised.value)
    assert isinstance(raised.value, redis.ConnectionError)  # OUTAGE_ERRORS still catch it
    # A caller that waits outages out itself (no retry) gets the outage's own error.
    with pytest.raises(redis.ConnectionError) as direct:
        retrying(down, what="read", deadline_seconds=0)
    assert not isinstance(direct.value, RedisUnreachableError)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", "worker", "trainer"],
        env={
            **os.environ,
            "RLHFSPEC_JOB": "job",
            # Nothing listens there: every connection is refused.
            "RLHFSPEC_REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0",
            "RLHFSPEC_JOB_CONFIG": str(ROOT / "examples" / "tiny-grpo.yaml"),
            "RLHFSPEC_STORAGE": str(tmp_path),
            "RLHFSPEC_LOCAL": "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )


def test_a_worker_refuses_a_bad_limit_at_start(tmp_path: Path) -> None:
    result = _worker(tmp_path, **{RETRY_SECONDS_ENV: "0"})
    assert result.returncode == 2, result.stderr
    assert f"{RETRY_SECONDS_ENV}='0': expected a number of seconds > 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_that_cannot_reach_redis_past_the_limit_exits_3(
    tiny_kit: Path, tmp_path: Path
) -> None:
    result = _worker(tmp_path, **{RETRY_SECONDS_ENV: "1"})
    assert result.returncode == REDIS_UNREACHABLE == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rlhfspec worker trainer: Redis unreachable for "), last
    assert "during connect, past the retry limit of 1s" in last
    assert "exiting so the pod is restarted" in last


@dataclass
class RedisPartition:
    """Called every poll of the harness: SIGSTOPs the redis-server once ``trigger`` exists,
    SIGCONTs it ``seconds`` later (or at :meth:`heal`)."""

    trigger: Path
    seconds: float
    pid: int | None = None
    stopped_at: float | None = None
    resumed_at: float | None = None

    def __call__(self, supervisor: Supervisor, redis_server: RedisServer) -> None:
        now = time.monotonic()
        if self.stopped_at is None and self.trigger.exists():
            assert redis_server.process is not None
            self.pid = redis_server.process.pid
            os.kill(self.pid, signal.SIGSTOP)
            self.stopped_at = now
        elif self.stopped_at is not None and now - self.stopped_at >= self.seconds:
            self.heal()

    def heal(self) -> None:
        if self.pid is not None and self.resumed_at is None:
            os.kill(self.pid, signal.SIGCONT)
            self.resumed_at = time.monotonic()


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_a_partition_past_the_retry_limit_restarts_the_workers_and_trains_every_sample_once(
    tiny_kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RETRY_SECONDS_ENV, str(LIMIT_SECONDS))
    run_dir = tmp_path / "run"
    partition = RedisPartition(record_path(run_dir, 1), PARTITION_SECONDS)
    try:
        run = run_job(
            fault_job(), run_dir, None, chaos=partition, restart_codes=(REDIS_UNREACHABLE,)
        )
    finally:
        partition.heal()
    assert partition.stopped_at is not None and partition.resumed_at is not None
    assert partition.resumed_at - partition.stopped_at >= PARTITION_SECONDS
    # Nothing was SIGKILLed; every worker that called Redis during the partition gave up
    # with the limit named and was restarted (a restart into the partition may exit again).
    assert run.killed == []
    assert run.exits and {rc for _, rc in run.exits} == {REDIS_UNREACHABLE}, run.exits
    exited = {name for name, _ in run.exits}
    for name in exited:
        log = run.log(name)
        assert f"past the retry limit of {LIMIT_SECONDS}s" in log, log[-2000:]
        assert "exiting so the pod is restarted" in log
    # Every role polls Redis at least once a few seconds: each one noticed the partition.
    assert {name.rsplit("-", 1)[0] for name in exited} == {
        "coordinator",
        "generation",
        "inference",
        "trainer",
    }, run.exits
    for iteration in range(1, ITERATIONS + 1):
        ids = [line["sample_id"] for line in run.trained[iteration]]
        assert sorted(ids) == expected_sample_ids(run.job, run.run_dir, iteration), ids
        assert len(ids) == len(set(ids))
    samples = ITERATIONS * PROMPTS * SAMPLES
    assert run.stream_lengths == {"tasks": samples, "rollouts": samples, "experience": samples}
    assert run.metrics_rows == list(range(1, ITERATIONS + 1))
