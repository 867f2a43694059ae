"""Malformed RLHFJob manifests: each yields exactly the expected `field.path: ... (...)` line."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhfspec_api.manifest import ManifestError, parse_rlhfjob

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def base() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / "tiny-grpo.yaml").read_text())
    return copy.deepcopy(loaded)


FETCHED_ALLOWED = (
    "(hf://ORG/NAME[@REVISION][/PATH], https://HOST/FILE (a file, or a .tar, .tar.gz, .tgz or "
    ".zip archive of a model directory), s3://BUCKET/KEY (an object, or the objects under "
    "KEY/; GCS through spec.credentials.s3.endpoint https://storage.googleapis.com with HMAC "
    "keys), or pvc:// after copying it into the job's storage)"
)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        last = keys[-1]
        if value is _DELETE:
            del node[last]
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _both(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(doc)

    return mutate


_DELETE = object()

# (case id, mutation, expected error line). Every expected line names the field, what is
# wrong and, in parentheses, what is allowed.
CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("wrong-kind", _set("kind", "Job"), "kind: 'Job' is not an RLHFJob (RLHFJob)"),
    (
        "wrong-api-version",
        _set("apiVersion", "rlhfspec.io/v1"),
        "apiVersion: 'rlhfspec.io/v1' is not supported (rlhfspec.io/v1alpha1)",
    ),
    (
        "bad-name",
        _set("metadata.name", "Tiny_GRPO"),
        "metadata.name: 'Tiny_GRPO' is not a valid job name (lowercase letters, digits and '-', "
        "starting with a letter, at most 40 characters)",
    ),
    (
        "unknown-algorithm",
        _set("spec.algorithm.name", "dpo"),
        "spec.algorithm.name: 'dpo' is not a valid choice (one of grpo, ppo, rloo)",
    ),
    (
        "grpo-one-sample",
        # microBatchSize shrinks too, or it would exceed the 32 samples per iteration.
        _both(_set("spec.algorithm.samplesPerPrompt", 1), _set("spec.algorithm.microBatchSize", 8)),
        "spec.algorithm.samplesPerPrompt: grpo compares each sample with its prompt's group and "
        "needs at least 2 samples per prompt, got 1 (>= 2 for grpo)",
    ),
    (
        "ppo-without-critic",
        _set("spec.algorithm.name", "ppo"),
        "spec.models.critic: ppo needs a critic model (set models.critic.path)",
    ),
    (
        "draft-tokens-too-many",
        _set("spec.generation.speculative.maxDraftTokens", 17),
        "spec.generation.speculative.maxDraftTokens: 17 is out of range (an integer 1..16)",
    ),
    (
        "draft-tokens-zero",
        _set("spec.generation.speculative.maxDraftTokens", 0),
        "spec.generation.speculative.maxDraftTokens: 0 is out of range (an integer 1..16)",
    ),
    (
        "draft-model-without-model",
        _set("spec.generation.speculative.drafters.0", {"method": "draft_model"}),
        "spec.generation.speculative.drafters[0].model: draft_model needs a draft model "
        "(set model.path)",
    ),
    (
        "unknown-drafter",
        _set("spec.generation.speculative.drafters.1", {"method": "medusa"}),
        "spec.generation.speculative.drafters[1].method: 'medusa' is not a valid choice "
        "(one of draft_model, ngram, suffix, suffix_tree, eagle)",
    ),
    (
        "unknown-field",
        _set("spec.generation.maxTokens", 64),
        "spec.generation.maxTokens: unknown field (known fields: replicas, maxNewTokens, "
        "temperature, topP, stop, speculative, reallocation, resources, dtype, "
        "gpuMemoryUtilization)",
    ),
    (
        "missing-policy",
        _set("spec.models", {}),
        "spec.models.policy: required field is missing (an object with fields path, dtype)",
    ),
    (
        "replicas-as-string",
        _set("spec.generation.replicas", "two"),
        "spec.generation.replicas: 'two' is a string, not an integer (an integer 1..1024)",
    ),
    (
        "bad-quantity",
        _set("spec.trainer.resources.memory", "lots"),
        "spec.trainer.resources.memory: 'lots' is not a resource quantity (a Kubernetes quantity "
        "such as 2, 500m, 8Gi)",
    ),
    (
        "bad-model-scheme",
        _set("spec.models.policy.path", "ftp://models/policy"),
        "spec.models.policy.path: unknown scheme 'ftp' in 'ftp://models/policy' (a path, or a "
        "URI tiny://..., zoo://..., hf://..., https://..., s3://..., pvc://..., file://...)",
    ),
    (
        "model-on-gs",
        _set("spec.models.policy.path", "gs://bucket/policy"),
        "spec.models.policy.path: gs:// ('gs://bucket/policy') is not supported: the worker "
        "image has no GCS client " + FETCHED_ALLOWED,
    ),
    (
        "s3-without-bucket",
        _set("spec.models.policy.path", "s3:///policy"),
        "spec.models.policy.path: 's3:///policy': names no bucket " + FETCHED_ALLOWED,
    ),
    (
        "s3-one-key",
        _set("spec.credentials", {"s3": {"accessKeyId": {"name": "s3", "key": "id"}}}),
        "spec.credentials.s3.secretAccessKey: one of the two S3 keys is named without the other "
        "(both accessKeyId and secretAccessKey, or neither (a public bucket))",
    ),
    (
        "hf-without-org",
        _set("spec.models.policy.path", "hf://gpt2"),
        "spec.models.policy.path: 'hf://gpt2': names no repository ORG/NAME " + FETCHED_ALLOWED,
    ),
    (
        "dataset-on-gs",
        _set("spec.dataset.path", "gs://bucket/train.jsonl"),
        "spec.dataset.path: gs:// ('gs://bucket/train.jsonl') is not supported: the worker "
        "image has no GCS client " + FETCHED_ALLOWED,
    ),
    (
        "dataset-unknown-scheme",
        _set("spec.dataset.eval", "ftp://host/eval.jsonl"),
        "spec.dataset.eval: unknown scheme 'ftp' in 'ftp://host/eval.jsonl' (a path, or a URI "
        "tiny://..., hf://..., https://..., s3://..., pvc://..., file://...)",
    ),
    (
        "hf-token-without-key",
        _set("spec.credentials", {"hfToken": {"name": "hf"}}),
        "spec.credentials.hfToken.key: required field is missing (a string)",
    ),
    (
        "top-p-zero",
        _set("spec.generation.topP", 0),
        "spec.generation.topP: 0 is out of range (a number > 0.0 and <= 1.0)",
    ),
    (
        "migration-method",
        _set("spec.generation.reallocation.migration", "rdma"),
        "spec.generation.reallocation.migration: 'rdma' is not a valid choice "
        "(one of recompute, kv, auto)",
    ),
    (
        "storage-two-choices",
        _set("spec.storage", {"size": "1Gi", "claimName": "data"}),
        "spec.storage: exactly one of claimName, size, path is needed, got claimName, size "
        "(one of claimName, size, path)",
    ),
    (
        "external-without-url",
        _set("spec.coordinator", {"mode": "external"}),
        "spec.coordinator.url: external mode needs a Redis URL (redis://host:port/db)",
    ),
    (
        "eagle-on-cpu",
        _set(
            "spec.generation.speculative.drafters.2",
            {"method": "eagle", "model": {"path": "hf://x/eagle"}},
        ),
        "spec.generation.speculative.drafters[2].method: eagle runs only on GPU generation pods "
        "(set generation.resources.gpu >= 1, or use draft_model, ngram, suffix)",
    ),
    (
        "duplicate-drafter",
        _set("spec.generation.speculative.drafters.2", {"method": "suffix"}),
        "spec.generation.speculative.drafters: method listed more than once: suffix "
        "(each method at most once)",
    ),
    (
        "fixed-with-many-drafters",
        _set("spec.generation.speculative.mode", "fixed"),
        "spec.generation.speculative.drafters: mode fixed uses exactly one drafter, got 3 "
        "(one drafter, or mode: adaptive to choose among several)",
    ),
    (
        "native-execution-with-several-drafters",
        _set("spec.generation.speculative.selector", {"execution": "native"}),
        "spec.generation.speculative.selector.execution: native runs exactly one drafter that "
        "vLLM runs itself (got draft_model, suffix, ngram) (one drafter of draft_model, eagle, "
        "ngram, or proposer)",
    ),
    (
        "native-execution-with-a-model-free-drafter-vllm-lacks",
        _both(
            _set("spec.generation.speculative.selector", {"execution": "native"}),
            _set("spec.generation.speculative.drafters", [{"method": "suffix"}]),
        ),
        "spec.generation.speculative.selector.execution: native runs exactly one drafter that "
        "vLLM runs itself (got suffix) (one drafter of draft_model, eagle, ngram, or proposer)",
    ),
    (
        "native-execution-in-fixed-mode",
        _both(
            _set("spec.generation.speculative.selector", {"execution": "native"}),
            _set("spec.generation.speculative.mode", "fixed"),
            _set("spec.generation.speculative.drafters", [{"method": "ngram"}]),
        ),
        "spec.generation.speculative.selector.execution: native applies to mode adaptive, not "
        "fixed (proposer, or mode: adaptive)",
    ),
    (
        "native-execution-of-a-refreshed-draft",
        _both(
            _set("spec.generation.speculative.selector", {"execution": "native"}),
            _set(
                "spec.generation.speculative.drafters",
                [
                    {
                        "method": "draft_model",
                        "model": {"path": "tiny://draft"},
                        "refresh": {"every": 1},
                    }
                ],
            ),
        ),
        "spec.generation.speculative.selector.execution: native cannot load a refreshed draft "
        "into vLLM's own drafter (proposer, or remove drafters[0].refresh)",
    ),
    (
        "micro-batch-too-big",
        _set("spec.algorithm.microBatchSize", 1000),
        "spec.algorithm.microBatchSize: 1000 exceeds the samples per iteration (256) (1..256)",
    ),
    (
        "unknown-reward-rule",
        _set("spec.reward.rule", "gsm8k"),
        "spec.reward.rule: 'gsm8k' is not a valid choice (one of math_answer, exact_match, "
        "regex, sort_digits, final_number)",
    ),
    (
        "reward-model-missing",
        _set("spec.reward", {"type": "model"}),
        "spec.models.reward: reward.type model needs a reward model (set models.reward.path, or "
        "reward.type: rule)",
    ),
    (
        "missing-spec",
        _set("spec", _DELETE),
        "spec: required object is missing (an object with models and dataset)",
    ),
    (
        "ngram-bounds",
        _set("spec.generation.speculative.drafters.2.promptLookupMin", 5),
        "spec.generation.speculative.drafters[2].promptLookupMin: 5 is greater than "
        "promptLookupMax 4 (promptLookupMin <= promptLookupMax)",
    ),
]


def test_there_are_at_least_fifteen_cases() -> None:
    assert len(CASES) >= 15
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("case_id", "mutate", "expected"), CASES, ids=[c[0] for c in CASES])
def test_malformed_manifest_names_field_and_allowed(
    case_id: str, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    doc = base()
    parse_rlhfjob(doc)  # the base is valid: the mutation alone causes the error
    mutate(doc)
    with pytest.raises(ManifestError) as info:
        parse_rlhfjob(doc)
    lines = [str(e) for e in info.value.errors]
    assert lines == [expected]


def test_every_error_is_listed_in_one_pass() -> None:
    doc = base()
    doc["spec"]["algorithm"]["learningRate"] = -1
    doc["spec"]["generation"]["replicas"] = 0
    doc["spec"]["generation"]["speculative"]["maxDraftTokens"] = 99
    with pytest.raises(ManifestError) as info:
        parse_rlhfjob(doc)
    paths = sorted(e.path for e in info.value.errors)
    assert paths == [
        "spec.algorithm.learningRate",
        "spec.generation.replicas",
        "spec.generation.speculative.maxDraftTokens",
    ]


def test_not_a_mapping_is_one_clear_error() -> None:
    with pytest.raises(ManifestError) as info:
        parse_rlhfjob(["a", "list"])
    assert [str(e) for e in info.value.errors] == ["(document): is a list (a mapping (an RLHFJob))"]
