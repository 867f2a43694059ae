"""The fetch init container (``rlhfspec_operator.fetch_init``): present on every worker pod of a
job with hf:// or https:// locations and absent otherwise, valid Kubernetes (strict), the
worker's image and security context, credentials only as ``secretKeyRef`` env from the Secret
``spec.credentials`` names; and the ``ModelsReady`` condition read back from the pods' init
container statuses."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from rlhfspec_api.manifest import RLHFJob, parse_rlhfjob
from rlhfspec_api.status import ConditionStatus, ConditionType, RLHFJobStatus
from rlhfspec_operator import builders
from rlhfspec_operator.conditions import condition
from rlhfspec_operator.fetch_init import (
    FETCH_CONTAINER,
    fetch_state,
    set_models_ready,
)
from rlhfspec_operator.naming import Owner
from rlhfspec_operator.pods import pod_view

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
NOW = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.UTC)
POLICY = "hf://org/policy@v1"
DATASET = "https://data.example/sort/train.jsonl"


def make_job(policy: str = POLICY, dataset: str = DATASET, **spec: Any) -> RLHFJob:
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"]["namespace"] = "team-a"
    doc["spec"]["models"]["policy"]["path"] = policy
    doc["spec"]["dataset"]["path"] = dataset
    doc["spec"].update(spec)
    return parse_rlhfjob(doc)


def pods_of(job: RLHFJob) -> list[dict[str, Any]]:
    return builders.worker_pods(job, Owner(job.name, job.namespace, "uid-1"))


def test_every_worker_pod_fetches_first_and_validates_strictly() -> None:
    job = make_job(credentials={"hfToken": {"name": "hf-secret", "key": "token"}})
    pods = pods_of(job)
    assert len(pods) == 4  # coordinator, one generation replica, inference, trainer
    for pod in pods:
        kubernetes_validate.validate(pod, "1.32.0", strict=True)
        spec = pod["spec"]
        worker = spec["containers"][0]
        [init] = spec["initContainers"]
        assert init["name"] == FETCH_CONTAINER
        assert init["command"] == ["rlhfspec", "worker", "fetch"]
        assert init["image"] == worker["image"] == job.spec.image
        assert init["securityContext"] == worker["securityContext"]
        assert init["securityContext"]["readOnlyRootFilesystem"] is True
        assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert {m["mountPath"]: m["name"] for m in init["volumeMounts"]} == {
            "/etc/rlhfspec": "config",
            "/data": "storage",
            "/tmp": "tmp",
        }
        assert init["resources"]["requests"] == init["resources"]["limits"]
        assert set(init["resources"]["limits"]) == {"cpu", "memory"}  # no accelerator
        env = {e["name"]: e for e in init["env"]}
        assert env["RLHFSPEC_JOB_CONFIG"]["value"] == "/etc/rlhfspec/job.yaml"
        assert env["RLHFSPEC_STORAGE"]["value"] == "/data"
        assert env["HF_TOKEN"] == {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf-secret", "key": "token"}},
        }
        # The token is the init container's alone: the worker never sees it.
        assert "HF_TOKEN" not in {e["name"] for e in worker["env"]}


def test_s3_settings_and_keys_reach_only_the_init_container() -> None:
    keys = {
        "endpoint": "http://minio.infra:9000",
        "region": "auto",
        "accessKeyId": {"name": "s3", "key": "id"},
        "secretAccessKey": {"name": "s3", "key": "secret"},
    }
    job = make_job(policy="s3://models/policy", credentials={"s3": keys})
    for pod in pods_of(job):
        kubernetes_validate.validate(pod, "1.32.0", strict=True)
        [init] = pod["spec"]["initContainers"]
        env = {e["name"]: e for e in init["env"]}
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.infra:9000"
        assert env["AWS_REGION"]["value"] == "auto"
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
            "secretKeyRef": {"name": "s3", "key": "id"}
        }
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
            "secretKeyRef": {"name": "s3", "key": "secret"}
        }
        worker_env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
        assert not worker_env & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"}


def test_no_init_container_without_remote_locations_and_no_token_without_credentials() -> None:
    local = make_job(policy="tiny://policy", dataset="tiny://dataset/train.jsonl")
    assert all("initContainers" not in pod["spec"] for pod in pods_of(local))
    public = make_job()
    for pod in pods_of(public):
        [init] = pod["spec"]["initContainers"]
        assert "HF_TOKEN" not in {e["name"] for e in init["env"]}
    # A remote dataset alone is enough to need the fetch.
    dataset_only = make_job(policy="tiny://policy")
    assert all(len(pod["spec"]["initContainers"]) == 1 for pod in pods_of(dataset_only))


def _pod(name: str, init_state: dict[str, Any] | None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Pending"}
    if init_state is not None:
        status["initContainerStatuses"] = [{"name": FETCH_CONTAINER, "state": init_state}]
    labels = {"rlhfspec.io/job": "tiny-grpo", "rlhfspec.io/role": "generation"}
    return {"metadata": {"name": name, "labels": labels}, "status": status}


FAILED_MESSAGE = (
    "[rlhfspec] fetch: spec.dataset.path: https://data.example/x (reused)\n"
    "fetch failed: spec.models.policy.path: hf://org/policy@v1: download from the hub failed: "
    "HTTP 404: Repository Not Found for url ...\n"
)


def test_fetch_state_reads_the_init_container_and_its_termination_message() -> None:
    assert fetch_state(_pod("p", None)["status"]) == ("", "")
    assert fetch_state(_pod("p", {"waiting": {"reason": "PodInitializing"}})["status"]) == ("", "")
    assert fetch_state(_pod("p", {"running": {}})["status"]) == ("running", "")
    assert fetch_state(_pod("p", {"terminated": {"exitCode": 0}})["status"]) == ("done", "")
    summary = "fetched: hf://org/policy@v1 (downloaded 16.2 MiB in 3.1s)\nfetched: x (reused)\n"
    done = {"terminated": {"exitCode": 0, "message": summary}}
    assert fetch_state(_pod("p", done)["status"]) == (
        "done",
        "hf://org/policy@v1 (downloaded 16.2 MiB in 3.1s); x (reused)",
    )
    failed = {"terminated": {"exitCode": 1, "reason": "Error", "message": FAILED_MESSAGE}}
    assert fetch_state(_pod("p", failed)["status"]) == (
        "failed",
        "spec.models.policy.path: hf://org/policy@v1: download from the hub failed: HTTP 404: "
        "Repository Not Found for url ...",
    )
    missing = {
        "waiting": {"reason": "CreateContainerConfigError", "message": 'secret "hf" not found'}
    }
    assert fetch_state(_pod("p", missing)["status"]) == (
        "blocked",
        'CreateContainerConfigError: secret "hf" not found',
    )
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    assert fetch_state(_pod("p", oom)["status"]) == ("failed", "OOMKilled (exit code 137)")


def _models_ready(
    job: RLHFJob, pods: list[dict[str, Any]], status: RLHFJobStatus | None = None
) -> RLHFJobStatus:
    status = status or RLHFJobStatus()
    set_models_ready(status, job, [pod_view(p) for p in pods], NOW, 3)
    return status


def test_models_ready_follows_the_pods_fetches() -> None:
    job = make_job()
    pending = condition(_models_ready(job, [_pod("a", None)]), ConditionType.MODELS_READY)
    assert pending is not None and pending.status is ConditionStatus.FALSE
    assert pending.reason == "Pending" and POLICY in pending.message and DATASET in pending.message

    fetching = condition(
        _models_ready(job, [_pod("a", {"running": {}})]), ConditionType.MODELS_READY
    )
    assert fetching is not None and fetching.reason == "Fetching"

    no_secret = {"waiting": {"reason": "CreateContainerConfigError", "message": "secret missing"}}
    blocked = condition(_models_ready(job, [_pod("a", no_secret)]), ConditionType.MODELS_READY)
    assert blocked is not None and blocked.reason == "FetchBlocked"
    assert blocked.message == (
        "pod a: the fetch cannot start: CreateContainerConfigError: secret missing"
    )

    failed_state = {"terminated": {"exitCode": 1, "message": FAILED_MESSAGE}}
    failed = condition(_models_ready(job, [_pod("b", failed_state)]), ConditionType.MODELS_READY)
    assert failed is not None and failed.status is ConditionStatus.FALSE
    assert failed.reason == "FetchFailed"
    assert failed.message.startswith("pod b: spec.models.policy.path: hf://org/policy@v1: ")
    assert "HTTP 404" in failed.message

    reused = {"terminated": {"exitCode": 0, "message": f"fetched: {POLICY} (reused, 1.0 MiB)"}}
    downloaded = {
        "terminated": {"exitCode": 0, "message": f"fetched: {POLICY} (downloaded 1.0 MiB in 2s)"}
    }
    done = _models_ready(job, [_pod("a", reused), _pod("b", downloaded), _pod("c", None)])
    ready = condition(done, ConditionType.MODELS_READY)
    assert ready is not None and ready.status is ConditionStatus.TRUE and ready.reason == "Fetched"
    assert ready.message == f"pod b: {POLICY} (downloaded 1.0 MiB in 2s)"
    # Later pods starting (their fetch reuses the copy) do not flip it back.
    later = condition(
        _models_ready(job, [_pod("c", {"running": {}})], done), ConditionType.MODELS_READY
    )
    assert later is not None and later.status is ConditionStatus.TRUE


def test_no_models_ready_condition_for_a_job_with_nothing_to_fetch() -> None:
    job = make_job(policy="tiny://policy", dataset="tiny://dataset/train.jsonl")
    assert condition(_models_ready(job, [_pod("a", None)]), ConditionType.MODELS_READY) is None
