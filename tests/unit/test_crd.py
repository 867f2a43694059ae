"""The CRD generated from the models: drift, structural rules, printer columns, schema checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rlhfspec_api.crd import PRINTER_COLUMNS, build_crd, render_crd_yaml, to_json_schema
from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_api.status import Condition, ConditionStatus, GenerationStatus, Phase, RLHFJobStatus

ROOT = Path(__file__).resolve().parents[2]


def schema() -> dict[str, Any]:
    crd = build_crd()
    result: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def test_committed_crd_equals_generated() -> None:
    committed = (ROOT / "crds" / "rlhfjob.yaml").read_text()
    assert committed == render_crd_yaml(), "run `rlhfspec crd -o crds/rlhfjob.yaml`"


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    return found


def test_schema_is_structural() -> None:
    for path, node in _walk(schema(), ""):
        assert "$ref" not in node and "$defs" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert "const" not in node, path
        assert node.get("default", 0) is not None, path
        if not node.get("x-kubernetes-int-or-string"):
            assert "type" in node, f"{path} has no type"
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, True), bool), path


def test_schema_carries_defaults_enums_ranges_and_descriptions() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    speculative = spec["generation"]["properties"]["speculative"]["properties"]
    assert speculative["maxDraftTokens"]["minimum"] == 1
    assert speculative["maxDraftTokens"]["maximum"] == 16
    assert speculative["maxDraftTokens"]["default"] == 8
    assert speculative["mode"]["enum"] == ["adaptive", "fixed", "off"]
    method = speculative["drafters"]["items"]["properties"]["method"]
    assert method["enum"] == ["draft_model", "ngram", "suffix", "suffix_tree", "eagle"]
    assert "prompt lookup" in method["description"]
    assert spec["algorithm"]["properties"]["name"]["enum"] == ["grpo", "ppo", "rloo"]
    assert spec["models"]["required"] == ["policy"]


def test_crd_names_status_subresource_and_printer_columns() -> None:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "rlhfjobs.rlhfspec.io"
    assert crd["spec"]["names"]["shortNames"] == ["rlhf"]
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.generation.replicas",
            "statusReplicasPath": ".status.generationReplicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    columns = version["additionalPrinterColumns"]
    names = [c["name"].upper() for c in columns if not c.get("priority")]
    assert names == ["PHASE", "ITER", "STRATEGY", "TOK/S", "ACCEPT", "REWARD", "EVAL", "AGE"]
    wide = [c["name"].upper() for c in columns if c.get("priority") == 1]
    assert wide == ["GENERATION REPLICAS", "READY", "MIGRATIONS"]
    # Like RayJob: `kubectl get all` does not list RLHFJobs.
    assert "all" not in crd["spec"]["names"]["categories"]


def test_scale_paths_point_at_integer_fields_with_a_minimum_of_one() -> None:
    properties = schema()["properties"]
    replicas = properties["spec"]["properties"]["generation"]["properties"]["replicas"]
    assert replicas["type"] == "integer" and replicas["minimum"] == 1
    status = properties["status"]["properties"]
    assert status["generationReplicas"]["type"] == "integer"
    assert status["selector"]["type"] == "string"


def test_printer_columns_point_at_real_status_fields() -> None:
    status = RLHFJobStatus(
        phase=Phase.RUNNING,
        progress="2/4",
        reward_mean=0.5,
        eval_accuracy=0.25,
        generation=GenerationStatus(
            tokens_per_second=100.0,
            mean_accepted_length=2.5,
            strategy="draft_model:k=4",
            migrations=3,
        ),
        generation_replicas=2,
    ).to_wire()
    obj = {
        "status": status,
        "spec": {"generation": {"replicas": 2}},
        "metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"},
    }
    for column in PRINTER_COLUMNS:
        node: Any = obj
        for key in column["jsonPath"].strip(".").split("."):
            node = node[key]
        assert node is not None, column


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(build_crd(), "1.32.0", strict=True)


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(to_json_schema(schema()))


EXAMPLE_FILES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.name)
def test_examples_validate_against_crd_schema_and_models(example: Path) -> None:
    for document in yaml.safe_load_all(example.read_text()):
        errors = [e.message for e in _validator().iter_errors(document)]
        assert errors == []
        parse_rlhfjob(document)


def test_crd_schema_rejects_unknown_and_out_of_range_fields() -> None:
    document = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    bad = copy.deepcopy(document)
    bad["spec"]["generation"]["maxTokens"] = 3
    assert any("maxTokens" in e.message for e in _validator().iter_errors(bad))
    bad = copy.deepcopy(document)
    bad["spec"]["generation"]["speculative"]["maxDraftTokens"] = 17
    assert list(_validator().iter_errors(bad))


def test_status_with_conditions_validates_against_schema() -> None:
    status = RLHFJobStatus(
        phase=Phase.FAILED,
        reason="BackoffLimitExceeded",
        conditions=[
            Condition(
                type="Failed",
                status=ConditionStatus.TRUE,
                reason="PodFailed",
                message="tiny-grpo-trainer exited 137 (OOMKilled)",
            )
        ],
    ).to_wire()
    document = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    document["status"] = status
    assert [e.message for e in _validator().iter_errors(document)] == []
