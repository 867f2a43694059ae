"""Pods really run: the process kubelet starts every pod the operator creates as a process.

The worker entry points are stand-ins (``fake_worker.py``: the contract checked in seconds, four
iterations faked; ``test_operator_e2e_training`` runs the real ones); what is real is everything
around them: the operator's pods, their env (Secret references resolved),
the mounted job config and storage, the managed Redis as the operator renders it (its
Deployment's AOF check init container, then redis-server on the redis.conf and password of the
job's Secret, its AOF on the job's claim), the coordinator's progress read back by the
operator, and the job's phase from exit codes.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from cluster import Cluster, example_job
from kubelet import ProcessKubelet

JOB = "tiny-grpo"
FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


def fake_command(pod: dict[str, Any]) -> list[str]:
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["rlhfspec", "worker"], command
    return [sys.executable, str(FAKE_WORKER), command[2]]


def test_an_applied_job_runs_its_pods_as_processes_and_succeeds(
    own_cluster: Cluster, tmp_path: Path
) -> None:
    cluster, namespace = own_cluster, "e2e"
    kubelet = ProcessKubelet(cluster, namespace, tmp_path / "node", command=fake_command).start()
    try:
        cluster.start_operator("--namespace", namespace, coordinator_url=kubelet.redis_url)
        doc = example_job(JOB, namespace)
        doc["spec"]["generation"]["replicas"] = 2
        cluster.apply(doc)
        try:
            status = cluster.wait_for_phase(JOB, namespace, "Succeeded", timeout=120)
        except AssertionError as exc:
            logs = {pod: kubelet.log(pod)[-500:] for pod in kubelet.exits}
            raise AssertionError(f"{exc}\nexits: {kubelet.exits}\nlogs: {logs}") from None
        # The Redis the workers used is the Deployment's: the Secret's password and config.
        secret = cluster.peek("v1/secrets", namespace)[f"{JOB}-redis"]["data"]
        password = base64.b64decode(secret["password"]).decode()
        client = redis.Redis(port=kubelet.redis_port, password=password)
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("aof-load-truncated") == {"aof-load-truncated": "no"}
        assert client.dbsize() > 0
        client.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=kubelet.redis_port).ping()
    finally:
        kubelet.stop()
    assert kubelet.errors == []
    assert kubelet.exits.get(f"{JOB}-coordinator") == 0, kubelet.log(f"{JOB}-coordinator")
    assert status["progress"] == "4/4" and status["rewardMean"] == 0.4
    assert status["generation"]["strategy"] == "suffix:k=4"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["CoordinatorReachable"]["status"] == "True"
    assert conditions["Succeeded"]["status"] == "True"
    # Every worker wrote to the one shared claim, and so did Redis (its AOF, in redis/).
    claim = tmp_path / "node" / "claims" / f"{JOB}-storage"
    touched = sorted(p.name for p in claim.iterdir())
    assert touched == sorted(
        ["redis"]
        + [
            f"{JOB}-{role}.touch"
            for role in ("coordinator", "generation-0", "generation-1", "inference", "trainer")
        ]
    )
    assert (claim / "redis" / "appendonlydir" / "appendonly.aof.manifest").is_file()
    assert "rlhfspec redis-aof-check: no AOF in" in kubelet.log(f"{JOB}-redis-0")
    row = cluster.kubectl("get", "rlhfjobs", "-n", namespace).splitlines()[1].split()
    assert row[:4] == [JOB, "Succeeded", "4/4", "suffix:k=4"]
