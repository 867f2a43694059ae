"""What the stricter contract still accepts, and the status size of a refused manifest.

The corpus test shows invalid input is refused; these show the checks did not overshoot:
Kubernetes quantities like ``1e3``, image references with registries, ports and digests,
int-or-string quantities, integers in float fields, the metadata the API server adds.
"""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhfspec_api import formats
from rlhfspec_api.echo import MAX_MESSAGE_CHARS
from rlhfspec_api.manifest import ManifestError, parse_documents, parse_rlhfjob
from rlhfspec_operator import status as state

ROOT = Path(__file__).resolve().parents[2]


def base() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    return copy.deepcopy(loaded)


@pytest.mark.parametrize("cpu", ["1e3", "1E3", 2, "500m", "0.5", "2k", "+1"])
def test_valid_cpu_quantities_are_accepted(cpu: object) -> None:
    doc = base()
    doc["spec"]["generation"]["resources"]["cpu"] = cpu
    job = parse_rlhfjob(doc)
    assert job.spec.generation.resources.cpu == str(cpu)


@pytest.mark.parametrize("size", ["1Gi", "1.5Ti", "100M", "1e9", 10_000_000_000])
def test_valid_storage_sizes_are_accepted(size: object) -> None:
    doc = base()
    doc["spec"]["storage"] = {"size": size, "storageClassName": "fast-ssd.example.com"}
    assert parse_rlhfjob(doc).spec.storage.size == str(size)


def test_floats_take_integers_and_yaml_booleans_still_work() -> None:
    doc = base()
    doc["spec"]["algorithm"]["learningRate"] = 1  # JSON has one number type
    doc["spec"]["generation"]["temperature"] = 0
    doc["spec"]["suspend"] = True
    doc["spec"]["dataset"]["chatTemplate"] = False  # unquoted off: a YAML boolean, by design
    spec = parse_rlhfjob(doc).spec
    assert spec.algorithm.learning_rate == 1.0
    assert spec.suspend is True
    assert spec.dataset.chat_template.value == "off"


@pytest.mark.parametrize(
    "image",
    [
        "redis",
        "redis:7.4-alpine",
        "docker.io/library/redis:7",
        "localhost:5000/team/worker:dev_1",
        "registry.Example.com:443/a/b-c__d.e:TAG.1-x",
        "[::1]:5000/worker:1",
        "ghcr.io/rlhfspec/worker-cpu@sha256:" + "a" * 64,
        "ghcr.io/rlhfspec/worker-cpu:0.1.0@sha256:" + "0" * 64,
    ],
)
def test_valid_image_references(image: str) -> None:
    assert formats.image_reference(image) is None
    doc = base()
    doc["spec"]["image"] = image
    doc["spec"]["coordinator"]["redisImage"] = image
    assert parse_rlhfjob(doc).spec.image == image


@pytest.mark.parametrize(
    "url",
    ["redis://redis.infra:6379/0", "rediss://10.0.0.7:6380", "redis://r", "redis://[::1]:6379/"],
)
def test_valid_redis_urls(url: str) -> None:
    doc = base()
    doc["spec"]["coordinator"] = {
        "mode": "external",
        "url": url,
        "passwordSecret": {"name": "redis-auth", "key": "redis.password_1"},
    }
    assert parse_rlhfjob(doc).spec.coordinator.url == url


def test_metadata_the_api_server_stores_is_accepted() -> None:
    doc = base()
    doc["metadata"].update(
        {
            "namespace": "team-a",
            "labels": {"app.kubernetes.io/name": "rlhf", "tier": ""},
            "annotations": {"note": "any text\nwith newlines", "example.com/owner": "x y"},
            "uid": "0f6c3e2a-0000-4000-8000-000000000000",
            "resourceVersion": "12345",
            "generation": 3,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "finalizers": ["kopf.zalando.org/KopfFinalizerMarker"],
            "managedFields": [{"manager": "kubectl", "operation": "Update"}],
        }
    )
    job = parse_rlhfjob(doc)
    assert job.namespace == "team-a"


def test_annotations_are_bounded_in_total() -> None:
    doc = base()
    doc["metadata"]["annotations"] = {f"k{i}": "v" * 1024 for i in range(300)}
    with pytest.raises(ManifestError) as info:
        parse_rlhfjob(doc)
    assert [e.path for e in info.value.errors] == ["metadata.annotations"]


def test_yaml_aliases_within_the_limits_still_load() -> None:
    text = (ROOT / "examples" / "tiny-grpo.yaml").read_text()
    text = text.replace(
        "resources: {cpu: 1, memory: 2Gi}", "resources: &small {cpu: 1, memory: 2Gi}"
    )
    text = text.replace("resources: {cpu: 1, memory: 4Gi}", "resources: *small")
    (document,) = parse_documents(text, "aliased.yaml")
    assert parse_rlhfjob(document.content).spec.trainer.resources.memory == "2Gi"


def test_validation_failed_status_stays_small() -> None:
    doc = base()
    doc["spec"]["storage"] = {"size": "9" * 700_000 + "Gi"}
    doc["spec"]["image"] = "x" * 700_000
    with pytest.raises(ManifestError) as info:
        parse_rlhfjob(doc)
    errors = [str(e) for e in info.value.errors]
    assert all(len(line) < 400 for line in errors)
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    # Even a caller that passes raw, uncut text gets a capped status and event.
    status, event = state.validation_failed([*errors, "z" * 1_000_000], 1, now)
    assert status.message is not None and len(status.message) <= MAX_MESSAGE_CHARS
    assert all(len(c.message) <= MAX_MESSAGE_CHARS for c in status.conditions)
    assert len(event.message) <= MAX_MESSAGE_CHARS
    assert len(json.dumps(status.to_wire())) < 4 * MAX_MESSAGE_CHARS
