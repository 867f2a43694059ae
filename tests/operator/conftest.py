"""Fixtures of the operator tests: one emulated cluster + operator per session, one namespace
per test, a real redis-server standing in for an external coordinator Redis.

Where it sits: ``cluster.Cluster`` does the work; this module decides lifetimes. The session
operator watches all namespaces, so tests isolate by namespace and run against a warm
operator (a few seconds each on 2 cores). Tests that kill the operator build their own.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

# pytest puts this folder on sys.path (rootdir-relative "prepend" imports, no __init__.py).
from cluster import (
    KUBECTL,
    POLICY_FLAGS,
    REDIS_PASSWORD,
    ROOT,
    UNREACHABLE_REDIS,
    Cluster,
    free_port,
    unique_namespace,
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH (.ci/setup installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            REDIS_PASSWORD,
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, password=REDIS_PASSWORD)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.1)
    yield client
    client.close()
    process.terminate()
    process.wait(timeout=10)


def make_cluster(workdir: Path) -> Cluster:
    if not Path(KUBECTL).exists():
        pytest.fail("kubectl is not on PATH nor in .tools/bin (the operator tests drive it)")
    cluster = Cluster(workdir)
    cluster.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds" / "rlhfjob.yaml"))
    return cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The shared cluster with a running operator watching every namespace."""
    shared = make_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        shared.start_operator("--all-namespaces", *POLICY_FLAGS, coordinator_url=UNREACHABLE_REDIS)
        yield shared
    finally:
        shared.close()


@pytest.fixture()
def own_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A private cluster (no operator started): for tests that stop or restart it."""
    private = make_cluster(tmp_path / "cluster")
    try:
        yield private
    finally:
        private.close()


@pytest.fixture()
def namespace(cluster: Cluster) -> Iterator[str]:
    name = unique_namespace()
    yield name
    # Stop the jobs' timers: later tests share the operator and the two cores.
    cluster.delete_jobs(name)
