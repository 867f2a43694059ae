"""The whole product through the control plane: kubectl -> operator -> pods -> real training.

Where it sits: the last step of the operator tests. An RLHFJob applied with the real
``kubectl`` to the emulator is reconciled by the real operator (``rlhfspec operator``, i.e.
``kopf run``); the process kubelet runs every pod it creates with the pod's own command,
``rlhfspec worker ROLE`` (the data plane: vLLM generation with a draft model, inference,
the GRPO trainer, the coordinator), against the job's managed Redis run from the operator's
Deployment (its AOF check init container, then ``redis-server`` on the ``redis.conf`` and
password of the job's Secret, its AOF on the job's claim). Nothing is faked: the tiny policy
trains, the coordinator's progress reaches the status through the operator's timer, and the
exit codes drive the phase to Succeeded.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster
from kubelet import ProcessKubelet

JOB = "e2e-grpo"
NAMESPACE = "e2e-train"
ITERATIONS, PROMPTS, SAMPLES = 2, 8, 4
TIMEOUT_SECONDS = 480.0  # measured on 2 cores: ~30 s alone, ~70 s beside another loop test
# The kubelet keeps the test user's caches: the tiny models `tiny_kit` built, vLLM's.
HOST_ENV = ("HOME", "RLHFSPEC_CACHE", "VLLM_CACHE_ROOT", "XDG_CACHE_HOME")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def tiny_grpo_job() -> dict[str, Any]:
    return {
        "apiVersion": "rlhfspec.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": JOB, "namespace": NAMESPACE},
        "spec": {
            "algorithm": {
                "name": "grpo",
                "iterations": ITERATIONS,
                "promptsPerIteration": PROMPTS,
                "samplesPerPrompt": SAMPLES,
                "learningRate": 3.0e-5,
                "microBatchSize": PROMPTS * SAMPLES,
                "miniBatches": 1,
                "seed": 0,
            },
            "models": {"policy": {"path": "tiny://policy"}},
            "reward": {"type": "rule", "rule": "sort_digits"},
            "dataset": {"path": "tiny://dataset/train.jsonl"},
            "generation": {
                "replicas": 1,
                "maxNewTokens": 32,
                "speculative": {
                    "mode": "fixed",
                    "numDraftTokens": 4,
                    "drafters": [{"method": "draft_model", "model": {"path": "tiny://draft"}}],
                },
                "resources": {"cpu": 1, "memory": "4Gi"},
            },
            "inference": {"resources": {"cpu": 1, "memory": "2Gi"}},
            "trainer": {"checkpointEvery": 1, "resources": {"cpu": 1, "memory": "4Gi"}},
            "coordinator": {"mode": "managed"},
            "storage": {"size": "1Gi"},
            # A failed pod fails the job at once: the test reports its log instead of waiting.
            "backoffLimit": 0,
        },
    }


def wait_until_finished(cluster: Cluster, kubelet: ProcessKubelet) -> str:
    """Poll the phase with kubectl until Succeeded or Failed; the pods' logs on a timeout."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    phase = ""
    while time.monotonic() < deadline:
        phase = cluster.jsonpath("rlhfjob", JOB, NAMESPACE, "{.status.phase}")
        if phase in ("Succeeded", "Failed"):
            return phase
        time.sleep(2.0)  # one kubectl process per poll: cheap next to the training
    raise AssertionError(
        f"{JOB} still {phase!r} after {TIMEOUT_SECONDS:.0f}s\n"
        + kubelet.log_tails()
        + cluster.log_tail()
    )


def test_kubectl_applied_job_trains_the_tiny_policy_to_succeeded(
    tiny_kit: Path, own_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = own_cluster
    node = tmp_path / "node"
    kubelet = ProcessKubelet(cluster, NAMESPACE, node, host_env=HOST_ENV).start()
    started = time.monotonic()
    try:
        cluster.start_operator("--namespace", NAMESPACE, coordinator_url=kubelet.redis_url)
        cluster.apply(tiny_grpo_job())
        phase = wait_until_finished(cluster, kubelet)
        elapsed = time.monotonic() - started
        status: dict[str, Any] = json.loads(
            cluster.jsonpath("rlhfjob", JOB, NAMESPACE, "{.status}")
        )
        describe = cluster.kubectl("describe", "rlhfjob", JOB, "-n", NAMESPACE)
        row = cluster.kubectl("get", "rlhfjobs", "-n", NAMESPACE).splitlines()
    finally:
        kubelet.stop()
    assert phase == "Succeeded", (
        f"{phase}: {status.get('reason')}: {status.get('message')}\n" + kubelet.log_tails()
    )
    print(f"\n{JOB}: Succeeded in {elapsed:.0f}s; {row}")
    assert kubelet.errors == []
    assert kubelet.exits[f"{JOB}-coordinator"] == 0, kubelet.log(f"{JOB}-coordinator")

    # Status, as kubectl shows it: the coordinator's last progress copied by the operator.
    assert status["reason"] == "Completed", status
    assert (status["iteration"], status["totalIterations"]) == (ITERATIONS, ITERATIONS)
    assert status["progress"] == f"{ITERATIONS}/{ITERATIONS}"
    generation = status["generation"]
    assert generation["tokensPerSecond"] > 0
    # fixed mode with the trained draft: vLLM accepted drafts, > 1 token per verification step
    assert generation["meanAcceptedLength"] > 1.0
    assert generation["weightVersion"] == ITERATIONS
    assert 0.0 <= status["rewardMean"] <= 1.0
    assert status["startTime"] and status["completionTime"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["CoordinatorReachable"]["status"] == "True"
    assert row[1].split()[:3] == [JOB, "Succeeded", f"{ITERATIONS}/{ITERATIONS}"], row

    # Events of every phase change, as kubectl describe lists them.
    events = describe.split("Events:", 1)[1]
    for reason in ("Initializing", "Running", "Succeeded"):
        assert re.search(rf"^\s*Normal\s+{reason}\s", events, re.MULTILINE), describe

    # The trainer's work on the job's claim: weights per iteration, checkpoints, metrics.
    storage = node / "claims" / f"{JOB}-storage"
    weights = sorted(p.name for p in (storage / "weights").iterdir())
    assert weights and weights[-1].endswith(str(ITERATIONS)), weights
    assert any((storage / "weights" / weights[-1]).glob("*.safetensors")), weights
    checkpoints = sorted(p.name for p in (storage / "checkpoints").iterdir())
    assert checkpoints and checkpoints[-1].endswith(str(ITERATIONS)), checkpoints
    records = [json.loads(line) for line in (storage / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, ITERATIONS + 1))
    assert all(r["samples"] == PROMPTS * SAMPLES for r in records)
    # The status rounds the reward to 4 digits (a kubectl get column).
    assert records[-1]["reward_mean"] == pytest.approx(status["rewardMean"], abs=1e-4)
