"""Durable coordinator state (issue 18 item 3): the managed Redis' own config and AOF check, run.

Real ``redis-server`` and ``redis-check-aof`` throughout. The operator's rendered ``redis.conf``
(from the job's Secret) and its init container's command (from the Deployment) start a real
Redis; acknowledged writes survive SIGKILL; a tail cut off by a crash is repaired and reported,
with the acknowledged prefix kept; damage inside the AOF, or AOF files without their manifest,
stop the start with the reason instead of loading an empty state. The last test restarts Redis
under a running ``rlhfspec run`` job.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from local_jobs import (
    SAMPLES_PER_ITERATION,
    kill_run,
    redis_pid,
    start_run,
    trained_iterations,
    trained_lines,
    wait_for,
    write_job,
)

from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_api.redis_conf import AOF_DIRNAME, AOF_MANIFEST
from rlhfspec_operator import builders, managed_redis
from rlhfspec_operator.naming import Owner
from rlhfspec_workers.local.redis_server import (
    AofDamagedError,
    RedisServer,
    find_redis_server,
    free_port,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _managed_job_objects() -> dict[tuple[str, str], dict[str, Any]]:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    doc["metadata"]["namespace"] = "team-a"
    job = parse_rlhfjob(doc)
    owner = Owner(name=job.name, namespace="team-a", uid="uid-1")
    objects = builders.children(job, owner, password="s3cret", operator_namespace="ops")
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def _incr_file(data_dir: Path) -> Path:
    manifest = (data_dir / AOF_DIRNAME / AOF_MANIFEST).read_text()
    last = [line.split()[1] for line in manifest.splitlines() if line.endswith(" type i")][-1]
    return data_dir / AOF_DIRNAME / last


@pytest.fixture
def pod_redis(tmp_path: Path) -> Iterator[tuple[list[str], list[str], Path]]:
    """The managed Redis as its pod runs it, on a temp dir for the claim's ``redis/``:
    (init container argv, redis-server argv, data dir). ``/data`` is the only line changed."""
    objects = _managed_job_objects()
    secret = objects[("Secret", "tiny-grpo-redis")]
    rendered = base64.b64decode(secret["data"][managed_redis.REDIS_CONFIG_KEY]).decode()
    data = tmp_path / "claim" / managed_redis.REDIS_CLAIM_SUBPATH
    ours = managed_redis.redis_config("s3cret", data_dir=str(data))
    changed = set(rendered.splitlines()) ^ set(ours.splitlines())
    assert changed == {"dir /data", f"dir {data}"}
    config = tmp_path / "redis.conf"
    config.write_text(ours)
    spec = objects[("Deployment", "tiny-grpo-redis")]["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["volumeMounts"] == [{"name": "data", "mountPath": managed_redis.CLAIM_MOUNT}]
    init_argv = [*init["command"][:-1], str(data)]
    assert init["command"][-1] == f"{managed_redis.CLAIM_MOUNT}/{managed_redis.REDIS_CLAIM_SUBPATH}"
    (container,) = spec["containers"]
    server_argv = [find_redis_server(), str(config), *container["command"][2:]]
    # The port is the pod's 6379 in the file; this shared machine may use it: only the port
    # and the bind address are given on the command line (they override the file).
    server_argv += ["--port", str(free_port()), "--bind", "127.0.0.1"]
    yield init_argv, server_argv, data


def _start(argv: list[str]) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    port = int(argv[argv.index("--port") + 1])
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password="s3cret")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client.ping()
            return process, client
        except redis.ConnectionError:
            assert process.poll() is None, "redis-server exited at start"
            time.sleep(0.05)
    process.kill()
    raise AssertionError("redis-server did not answer")


def test_the_operators_redis_config_and_init_check_run_a_redis_that_survives_sigkill(
    pod_redis: tuple[list[str], list[str], Path],
) -> None:
    init_argv, server_argv, data = pod_redis
    first = subprocess.run(init_argv, capture_output=True, text=True, check=True)
    assert "no AOF in" in first.stdout and data.is_dir()
    process, client = _start(server_argv)
    try:
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("dir") == {"dir": str(data)}
        for i in range(100):
            client.set(f"key{i}", i)
        client.xgroup_create("tasks", "generation", id="0", mkstream=True)
        client.xadd("tasks", {"data": "task"})
        client.xreadgroup("generation", "gen-0", {"tasks": ">"})  # pending, unacked
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    again = subprocess.run(init_argv, capture_output=True, text=True, check=True)
    assert "is valid" in again.stdout
    process, client = _start(server_argv)
    try:
        assert [client.get(f"key{i}") for i in (0, 99)] == [b"0", b"99"]
        assert client.dbsize() == 101
        assert client.xpending("tasks", "generation")["pending"] == 1
    finally:
        process.kill()
        process.wait()


def _write_then_crash(tmp_path: Path, keys: int) -> RedisServer:
    server = RedisServer(tmp_path / "redis", password="pw")
    server.start()
    client = redis.Redis.from_url(server.url)
    for i in range(keys):
        client.set(f"key{i}", "x" * 20)
    server.kill()
    return server


def test_a_tail_cut_off_by_a_crash_is_repaired_and_the_acknowledged_prefix_loads(
    tmp_path: Path,
) -> None:
    server = _write_then_crash(tmp_path, keys=50)
    incr = _incr_file(server.workdir)
    size = incr.stat().st_size
    with incr.open("r+b") as f:
        f.truncate(size - 9)  # the last SET loses its value's end: a write cut mid-way
    # Redis itself refuses it (aof-load-truncated no): only the check repairs, and says so.
    refused = subprocess.run(
        [find_redis_server(), str(server.config_path), "--port", str(free_port())],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode != 0
    server.start()
    try:
        assert "ends in a partial command cut off by a crash" in server.aof_check_report
        assert "repaired:" in server.aof_check_report
        assert "repaired:" in (server.workdir / "redis.log").read_text()
        client = redis.Redis.from_url(server.url)
        assert client.dbsize() == 49  # every complete write; the cut one is gone
        assert client.get("key48") == b"x" * 20 and client.get("key49") is None
    finally:
        server.stop()
    assert incr.stat().st_size < size - 9


def test_damage_inside_the_aof_is_refused_never_loaded_as_empty(tmp_path: Path) -> None:
    server = _write_then_crash(tmp_path, keys=50)
    incr = _incr_file(server.workdir)
    original = incr.read_bytes()
    damaged = bytearray(original)
    header = original.index(b"*3\r\n$3\r\n", len(original) // 2)
    damaged[header + 5 : header + 7] = b"99"  # a SET's length says 99: the parse derails
    incr.write_bytes(bytes(damaged))
    try:
        with pytest.raises(AofDamagedError, match=r"corrupt at byte \d+ with complete commands"):
            server.start()
    finally:
        server.stop()
    assert incr.read_bytes() == bytes(damaged)  # left for a person to inspect, not "repaired"
    assert not server.ping()  # nothing started
    # AOF files without their manifest: Redis would start empty; the check refuses.
    incr.write_bytes(original)
    (server.workdir / AOF_DIRNAME / AOF_MANIFEST).unlink()
    try:
        with pytest.raises(AofDamagedError, match="no manifest"):
            server.start()
    finally:
        server.stop()


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_redis_killed_under_a_running_job_is_restarted_and_the_job_succeeds(
    tiny_kit: Path, tmp_path: Path
) -> None:
    iterations = 3
    run_dir = tmp_path / "run"
    job = start_run(write_job(tmp_path, iterations), run_dir)
    try:
        # Mid-job: the first iteration trained, the second under way.
        wait_for(lambda: len(trained_lines(run_dir)) >= 1, 600, "iteration 1 to train", job)
        pid = redis_pid(run_dir)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # rlhfspec run restarts it as a cluster restarts the Redis pod: same port, password
        # and data directory, the AOF check first.
        output, _ = job.communicate(timeout=600)
        text = output.decode(errors="replace")
        assert job.returncode == 0, text[-4000:]
    finally:
        kill_run(job, run_dir)
    assert "redis-server exited (-9); restarting it" in text
    assert "redis-server is back: rlhfspec redis-aof-check: AOF in" in text
    log = (run_dir / "redis" / "redis.log").read_text()
    assert log.count("Ready to accept connections") == 2  # the first start, the restart
    assert "no AOF in" in log and "appendonlydir is valid" in log
    # Every iteration trained once, on all its samples; none lost, none repeated.
    assert trained_iterations(run_dir) == [
        (i, SAMPLES_PER_ITERATION) for i in range(1, iterations + 1)
    ]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["iteration"] for r in records] == list(range(1, iterations + 1))
