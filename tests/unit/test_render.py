"""``rlhfspec render``: every object it prints is valid Kubernetes (1.32, strict), for every
example and for manifests that set every optional field of the spec; it prints what the
operator's create handler creates (one shared list, ``plan.creation_plan``); bad input gets
the same field errors as ``rlhfspec validate`` and exit 1.

This is the CI check of issue #19 item 5: a builder change that produces an invalid object
for any spec field fails here, not on a cluster.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rlhfspec_api.crd import build_crd
from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_cli.render import PLACEHOLDER_UID, render_file
from rlhfspec_operator import admission, plan
from rlhfspec_operator.naming import Owner

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
K8S_VERSION = "1.32.0"

TINY = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())

# An external Redis over TLS, PPO with every model (some fetched from the hub with a token and
# from an S3-compatible store with keys), a weighted sum of every reward type, a held-out file
# fetched over HTTPS, fixed speculation, GPUs, a claim the user brings.
EXTERNAL_PPO: dict[str, Any] = {
    "apiVersion": "rlhfspec.io/v1alpha1",
    "kind": "RLHFJob",
    "metadata": {
        "name": "full-ppo",
        "namespace": "team-a",
        "labels": {"team": "a"},
        "annotations": {"owner": "someone@example.com"},
    },
    "spec": {
        "algorithm": {
            "name": "ppo",
            "iterations": 3,
            "promptsPerIteration": 16,
            "samplesPerPrompt": 2,
            "learningRate": 1e-5,
            "klCoef": 0.02,
            "clipRange": 0.1,
            "microBatchSize": 8,
            "miniBatches": 2,
            "gamma": 0.99,
            "gaeLambda": 0.9,
            "valueClipRange": 0.3,
            "seed": 7,
        },
        "models": {
            "policy": {"path": "pvc://models/policy", "dtype": "bfloat16"},
            "reference": {"path": "s3://models/reference", "dtype": "float32"},
            "critic": {"path": "pvc://models/critic", "dtype": "float16"},
            "reward": {"path": "hf://acme/reward-model@v2", "dtype": "float32"},
        },
        "rewards": [
            {"type": "rule", "rule": "regex", "pattern": "^[0-9]+$", "weight": 0.5, "name": "re"},
            {"type": "model", "weight": 0.25},
            {
                "type": "function",
                "function": "myreward:score",
                "configMap": "my-reward-code",
                "weight": 0.25,
            },
        ],
        "dataset": {
            "path": "pvc://data/train.jsonl",
            "promptField": "question",
            "answerField": "solution",
            "chatTemplate": "on",
            "eval": "https://data.example.com/eval.jsonl",
            "evalEvery": 2,
            "evalMaxTokens": 128,
        },
        "generation": {
            "replicas": 3,
            "maxNewTokens": 256,
            "temperature": 0.7,
            "topP": 0.95,
            "stop": ["</answer>"],
            "speculative": {
                "mode": "fixed",
                "drafters": [
                    {
                        "method": "eagle",
                        "model": {"path": "pvc://models/eagle"},
                    }
                ],
                "maxDraftTokens": 6,
                "numDraftTokens": 4,
                "selector": {
                    "hysteresis": 0.1,
                    "acceptanceHalfLifeSteps": 32,
                    "calibrate": False,
                    "execution": "proposer",
                },
            },
            "reallocation": {
                "enabled": True,
                "imbalanceThreshold": 0.3,
                "minGainSeconds": 0.1,
                "intervalSeconds": 1.0,
                "migration": "kv",
            },
            "resources": {
                "cpu": "8",
                "memory": "64Gi",
                "gpu": 2,
                "gpuResourceName": "amd.com/gpu",
            },
            "dtype": "bfloat16",
            "gpuMemoryUtilization": 0.8,
        },
        "inference": {
            "batchSize": 32,
            "resources": {"cpu": "4", "memory": "32Gi", "gpu": 1, "gpuResourceName": "amd.com/gpu"},
        },
        "trainer": {
            "checkpointEvery": 2,
            "keepCheckpoints": 3,
            "resources": {"cpu": "8", "memory": "64Gi", "gpu": 1, "gpuResourceName": "amd.com/gpu"},
        },
        "coordinator": {
            "mode": "external",
            "url": "rediss://redis.infra.svc:6380/2",
            "passwordSecret": {"name": "redis-auth", "key": "secret"},
            "caConfigMap": {"name": "redis-ca", "key": "ca.pem"},
        },
        "storage": {"claimName": "shared-checkpoints"},
        "credentials": {
            "hfToken": {"name": "hf-token", "key": "token"},
            "s3": {
                "endpoint": "http://minio.infra:9000",
                "region": "eu-west-1",
                "accessKeyId": {"name": "bucket-keys", "key": "id"},
                "secretAccessKey": {"name": "bucket-keys", "key": "secret"},
            },
        },
        "image": "ghcr.io/rlhfspec/worker-gpu:0.1.0",
        "backoffLimit": 5,
        "activeDeadlineSeconds": 86400,
        "startupDeadlineSeconds": 1800,
        "suspend": False,
    },
}

# Managed Redis with its own image, a created claim of a storage class, a held-out fraction,
# adaptive speculation over every model-free drafter with tuned parameters, ngram and suffix.
MANAGED_GRPO: dict[str, Any] = copy.deepcopy(TINY)
MANAGED_GRPO["metadata"] = {"name": "full-grpo", "namespace": "team-b"}
MANAGED_GRPO["spec"]["dataset"]["evalFraction"] = 0.1
MANAGED_GRPO["spec"]["generation"]["speculative"]["drafters"] = [
    {
        "method": "draft_model",
        "model": {"path": "tiny://draft", "dtype": "float32"},
        "refresh": {
            "every": 2,
            "onAcceptanceBelow": 0.3,
            "steps": 8,
            "batchSize": 4,
            "learningRate": 5e-5,
            "overlap": False,
        },
    },
    {"method": "suffix", "historyIterations": 2, "minMatch": 3},
    {"method": "ngram", "promptLookupMin": 1, "promptLookupMax": 5},
]
MANAGED_GRPO["spec"]["reward"] = {
    "type": "rule",
    "rule": "regex",
    "pattern": "^[0-9]+$",
    "weight": 2.0,
    "name": "digits",
}
MANAGED_GRPO["spec"]["coordinator"] = {"mode": "managed", "redisImage": "redis:7.4-alpine"}
MANAGED_GRPO["spec"]["storage"] = {"size": "20Gi", "storageClassName": "fast-rwx"}

# One function reward (its module files from a ConfigMap, mounted into every worker pod).
FUNCTION_REWARD: dict[str, Any] = copy.deepcopy(TINY)
FUNCTION_REWARD["metadata"] = {"name": "function-reward", "namespace": "team-c"}
FUNCTION_REWARD["spec"]["reward"] = {
    "type": "function",
    "function": "graders.sorting:score",
    "configMap": "graders",
    "weight": 1.5,
}

# Cluster controls: every pod template override field for every role, a Kueue queue, a TTL.
EVERY_OVERRIDE: dict[str, Any] = {
    "labels": {"team": "rl"},
    "annotations": {"example.com/owner": "rl"},
    "nodeSelector": {"pool": "rl"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "rl", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["rl"]}]}
                ]
            }
        }
    },
    "priorityClassName": "rl-batch",
    "serviceAccountName": "rl-worker",
    "imagePullSecrets": [{"name": "registry"}],
    "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    "envFrom": [{"prefix": "AWS_", "secretRef": {"name": "bucket"}}],
    "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "model-cache"}}],
    "volumeMounts": [{"name": "cache", "mountPath": "/models", "readOnly": True}],
}
SCHEDULED: dict[str, Any] = copy.deepcopy(TINY)
SCHEDULED["metadata"] = {
    "name": "scheduled",
    "namespace": "team-d",
    "labels": {"kueue.x-k8s.io/queue-name": "team-d"},
}
SCHEDULED["spec"]["podTemplateOverrides"] = {
    entry: copy.deepcopy(EVERY_OVERRIDE)
    for entry in ("default", "coordinator", "generation", "inference", "trainer")
}
SCHEDULED["spec"]["ttlSecondsAfterFinished"] = 600
SCHEDULED["spec"]["ttlDeletesJob"] = True

FULL_MANIFESTS = {
    "external-ppo": EXTERNAL_PPO,
    "managed-grpo": MANAGED_GRPO,
    "function-reward": FUNCTION_REWARD,
    "scheduled": SCHEDULED,
}


def render_text(path: Path, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = render_file(str(path), out, err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def rendered_objects(path: Path, **kwargs: Any) -> list[dict[str, Any]]:
    code, out, err = render_text(path, **kwargs)
    assert code == 0, err
    assert err == ""
    return [doc for doc in yaml.safe_load_all(out) if doc is not None]


def write(tmp_path: Path, name: str, *docs: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def cluster_ready(path: Path) -> bool:
    """Whether the operator admits the example (some examples are for `rlhfspec run` only)."""
    return not admission.spec_errors(parse_rlhfjob(yaml.safe_load(path.read_text())))


def assert_valid_objects(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_there_are_examples_the_operator_admits() -> None:
    assert len(EXAMPLES) >= 2
    assert sum(cluster_ready(p) for p in EXAMPLES) >= 2


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_renders_objects_that_pass_strict_validation(example: Path) -> None:
    if not cluster_ready(example):
        # A local-only example (a dataset path on this machine): render refuses it with the
        # operator's own error, naming the field, and prints nothing to pipe into kubectl.
        code, out, err = render_text(example)
        assert code == 1 and out == ""
        assert f"{example}: spec.dataset.path: " in err
        assert "not rendered: the operator would refuse it" in err
        return
    objects = rendered_objects(example)
    assert_valid_objects(objects)
    kinds = {obj["kind"] for obj in objects}
    assert {"ConfigMap", "Secret", "Service", "NetworkPolicy"} <= kinds
    # A job created suspended gets its pods when it is resumed, not before.
    suspended = bool(yaml.safe_load(example.read_text())["spec"].get("suspend"))
    assert ("Pod" in kinds) is not suspended


@pytest.mark.parametrize("name", sorted(FULL_MANIFESTS))
def test_manifests_with_every_optional_field_render_valid_objects(
    name: str, tmp_path: Path
) -> None:
    objects = rendered_objects(write(tmp_path, f"{name}.yaml", FULL_MANIFESTS[name]))
    assert_valid_objects(objects)
    pods = [o for o in objects if o["kind"] == "Pod"]
    replicas = FULL_MANIFESTS[name]["spec"]["generation"]["replicas"]
    assert len(pods) == 3 + replicas  # coordinator, inference, trainer, generation x N
    namespace = FULL_MANIFESTS[name]["metadata"]["namespace"]
    assert {o["metadata"]["namespace"] for o in objects} == {namespace}


def _schema_paths(node: dict[str, Any], prefix: str = "") -> set[str]:
    """Every field path (arrays as ``[]``) the CRD's spec schema declares."""
    paths = {prefix} if prefix else set()
    for key, sub in (node.get("properties") or {}).items():
        paths |= _schema_paths(sub, f"{prefix}.{key}" if prefix else key)
    if isinstance(node.get("items"), dict):
        paths |= _schema_paths(node["items"], f"{prefix}[]")
    return paths


def _document_paths(value: Any, prefix: str = "") -> set[str]:
    paths = {prefix} if prefix else set()
    if isinstance(value, dict):
        for key, sub in value.items():
            paths |= _document_paths(sub, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list):
        for item in value:
            paths |= _document_paths(item, f"{prefix}[]")
    return paths


def test_the_full_manifests_set_every_field_of_the_spec() -> None:
    """A field added to the spec must be added to a full manifest above, so that its
    rendered objects are validated too."""
    crd = build_crd()
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    declared = _schema_paths(spec_schema)
    used: set[str] = set()
    for doc in [*FULL_MANIFESTS.values(), TINY]:
        used |= _document_paths(doc["spec"])
    # storage.path is local-mode only: the operator refuses it (tested below).
    missing = sorted(declared - used - {"storage.path"})
    assert not missing, f"add these spec fields to a manifest in test_render.py: {missing}"


def test_render_is_the_create_handlers_list_with_a_placeholder_owner(tmp_path: Path) -> None:
    path = write(tmp_path, "job.yaml", MANAGED_GRPO)
    objects = rendered_objects(path)
    job = parse_rlhfjob(MANAGED_GRPO)
    owner = Owner(job.name, job.namespace, PLACEHOLDER_UID)
    expected = plan.creation_plan(
        job, owner, password="x", operator_namespace=None, metrics_from=[], with_pods=True
    )
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        (o["kind"], o["metadata"]["name"]) for o in expected
    ]
    # Secrets hold values drawn at render time; everything else is exactly the plan's.
    for got, want in zip(objects, expected, strict=True):
        if got["kind"] != "Secret":
            assert got == want
        for ref in got["metadata"]["ownerReferences"]:
            assert ref["uid"] == PLACEHOLDER_UID and ref["name"] == "full-grpo"


def test_namespace_flag_overrides_and_missing_namespace_is_default(tmp_path: Path) -> None:
    doc = copy.deepcopy(TINY)
    path = write(tmp_path, "job.yaml", doc)
    assert {o["metadata"]["namespace"] for o in rendered_objects(path)} == {"default"}
    objects = rendered_objects(path, namespace="ml-prod")
    assert {o["metadata"]["namespace"] for o in objects} == {"ml-prod"}
    config = next(o for o in objects if o["kind"] == "ConfigMap")
    assert "namespace: ml-prod" in config["data"]["job.yaml"]
    code, out, err = render_text(path, namespace="Not_A_Namespace")
    assert code == 1 and out == ""
    assert "metadata.namespace" in err


def test_suspended_job_renders_no_pods(tmp_path: Path) -> None:
    doc = copy.deepcopy(TINY)
    doc["spec"]["suspend"] = True
    objects = rendered_objects(write(tmp_path, "job.yaml", doc))
    assert objects and not [o for o in objects if o["kind"] == "Pod"]


def test_several_jobs_in_one_file_are_all_rendered(tmp_path: Path) -> None:
    second = copy.deepcopy(TINY)
    second["metadata"]["name"] = "tiny-two"
    objects = rendered_objects(write(tmp_path, "jobs.yaml", TINY, second))
    owners = {o["metadata"]["ownerReferences"][0]["name"] for o in objects}
    assert owners == {"tiny-grpo", "tiny-two"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_bad_input_prints_the_errors_validate_prints_and_exits_1(tmp_path: Path) -> None:
    doc = copy.deepcopy(TINY)
    doc["spec"]["generation"]["replicas"] = 0
    doc["spec"]["algorithm"]["learningRate"] = -1
    path = write(tmp_path, "bad.yaml", doc)
    rendered = _cli("render", str(path))
    validated = _cli("validate", str(path))
    assert rendered.returncode == 1 and validated.returncode == 1
    assert rendered.stdout == ""
    field_lines = [line for line in validated.stderr.splitlines() if line.startswith(f"{path}: ")]
    assert len(field_lines) == 2
    assert any("spec.generation.replicas" in line for line in field_lines)
    for line in field_lines:
        assert line in rendered.stderr.splitlines()


def test_cli_renders_an_example_and_documents_the_placeholders() -> None:
    result = _cli("render", "examples/tiny-grpo.yaml", "--namespace", "ci")
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {d["metadata"]["namespace"] for d in docs} == {"ci"}
    assert "# Source: examples/tiny-grpo.yaml (RLHFJob ci/tiny-grpo): Pod tiny-grpo-trainer" in (
        result.stdout
    )
    help_text = _cli("render", "--help").stdout
    assert PLACEHOLDER_UID in help_text and "generated" in help_text
    bad_peers = _cli("render", "examples/tiny-grpo.yaml", "--metrics-from", "{not json")
    assert bad_peers.returncode == 2 and "--metrics-from" in bad_peers.stderr
