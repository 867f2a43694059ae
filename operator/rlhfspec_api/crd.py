"""Generate the RLHFJob CustomResourceDefinition from the pydantic models.

Where it sits: ``rlhfspec crd`` prints :func:`build_crd`; ``crds/rlhfjob.yaml`` and the Helm
chart's copy are exactly that output (a test fails when they drift). Kubernetes needs a
*structural* OpenAPI v3 schema, which differs from pydantic's JSON Schema: no ``$ref``,
``nullable`` instead of ``anyOf [.., null]``, boolean ``exclusiveMinimum``, no ``const``, no
``additionalProperties: false`` (unknown fields are rejected by field validation instead),
and object defaults are left to the parser so the API server never stores half-defaulted
objects that our cross-field rules would reject.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from rlhfspec_api import API_GROUP, API_VERSION, KIND
from rlhfspec_api.crd_rules import rules_by_model
from rlhfspec_api.metadata import JOB_NAME_PATTERN, MAX_NAME_LENGTH
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_api.status import RLHFJobStatus

PLURAL = "rlhfjobs"
SINGULAR = "rlhfjob"
SHORT_NAMES = ["rlhf"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Iter", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Strategy", "type": "string", "jsonPath": ".status.generation.strategy"},
    {"name": "Tok/s", "type": "number", "jsonPath": ".status.generation.tokensPerSecond"},
    {"name": "Accept", "type": "number", "jsonPath": ".status.generation.meanAcceptedLength"},
    {"name": "Reward", "type": "number", "jsonPath": ".status.rewardMean"},
    {"name": "Eval", "type": "number", "jsonPath": ".status.evalAccuracy"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # priority 1: only `kubectl get rlhfjobs -o wide` shows these.
    {
        "name": "Generation Replicas",
        "type": "integer",
        "jsonPath": ".spec.generation.replicas",
        "priority": 1,
    },
    {"name": "Ready", "type": "integer", "jsonPath": ".status.generationReplicas", "priority": 1},
    {
        "name": "Migrations",
        "type": "integer",
        "jsonPath": ".status.generation.migrations",
        "priority": 1,
    },
]

SCALE_SUBRESOURCE: dict[str, str] = {
    # `kubectl scale rlhfjob X --replicas N` writes spec.generation.replicas; the operator
    # then creates or deletes generation pods (replicas below 1 fail the schema's minimum).
    "specReplicasPath": ".spec.generation.replicas",
    "statusReplicasPath": ".status.generationReplicas",
    "labelSelectorPath": ".status.selector",
}

_DROP_KEYS = {"title", "additionalProperties", "$defs"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every $ref; the referring node's own keys (its description) win."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return {key: _resolve(value, defs) for key, value in node.items()}


def _is_scalar_default(value: Any) -> bool:
    if isinstance(value, str | int | float | bool):
        return True
    return isinstance(value, list) and all(isinstance(v, str | int | float) for v in value)


def _structural(node: Any, unset_is_null: bool = False) -> Any:
    """Rewrite one resolved JSON Schema node into Kubernetes' structural dialect.

    ``unset_is_null``: a field whose default is null is left non-nullable, so the API server
    prunes an explicit null before validation and CEL rules see it as unset, as the models
    do (``None`` and absent are the same there). Fields with a non-null default stay
    nullable: their null means something (``answerField: null`` is "no answer field").
    """
    if isinstance(node, list):
        return [_structural(item, unset_is_null) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    any_of = node.get("anyOf")
    if isinstance(any_of, list) and {"type": "null"} in any_of:
        rest = [s for s in any_of if s != {"type": "null"}]
        node.pop("anyOf")
        inner = rest[0] if len(rest) == 1 else {"anyOf": rest}
        outer = {k: v for k, v in node.items()}
        node = {**inner, **outer, "nullable": True}
        if node.get("default", 0) is None:
            node.pop("default")
            if unset_is_null:
                node.pop("nullable")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(
        node["exclusiveMinimum"], bool
    ):
        node["minimum"] = node["exclusiveMinimum"]
        node["exclusiveMinimum"] = True
    if isinstance(node.get("exclusiveMaximum"), int | float) and not isinstance(
        node["exclusiveMaximum"], bool
    ):
        node["maximum"] = node["exclusiveMaximum"]
        node["exclusiveMaximum"] = True
    if "default" in node and not _is_scalar_default(node["default"]):
        node.pop("default")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "additionalProperties" and isinstance(value, dict):
            # A typed map (labels, nodeSelector): kept, its values checked by the server.
            out[key] = _structural(value, unset_is_null)
            continue
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, unset_is_null) for name, sub in value.items()}
        elif key in ("items", "anyOf", "allOf", "oneOf"):
            out[key] = _structural(value, unset_is_null)
        elif key == "description" and isinstance(value, str):
            # Docstrings use reST literals; kubectl explain shows plain text.
            out[key] = value.replace("``", "`")
        else:
            out[key] = value
    return out


def model_schema(model: type[RLHFJobSpec] | type[RLHFJobStatus]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a spec/status model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    if model is RLHFJobSpec:
        # Each model's CEL rules go on its definition, so inlining puts them wherever the
        # model appears (spec.reward and every spec.rewards item alike).
        for title, rules in rules_by_model().items():
            target = raw if title == model.__name__ else defs[title]
            target["x-kubernetes-validations"] = rules
    resolved = _resolve(raw, defs)
    schema: dict[str, Any] = _structural(resolved, unset_is_null=model is RLHFJobSpec)
    return schema


def open_api_schema() -> dict[str, Any]:
    """The RLHFJob's openAPIV3Schema (whole object: apiVersion, kind, metadata, spec, status)."""
    status = model_schema(RLHFJobStatus)
    conditions = status["properties"]["conditions"]
    # Conditions are a map keyed by type: server-side apply merges them by type.
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return {
        "type": "object",
        "description": "An RLHF training job whose generation stage runs adaptive speculative "
        "decoding and sample reallocation.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # The API server lets a CRD restrict only name and generateName of metadata.
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": MAX_NAME_LENGTH,
                        "pattern": JOB_NAME_PATTERN,
                    }
                },
            },
            "spec": model_schema(RLHFJobSpec),
            "status": status,
        },
    }


def build_crd() -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of RLHFJob."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "rlhfspec",
                "app.kubernetes.io/part-of": "rlhfspec",
            },
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["rlhfspec"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}, "scale": SCALE_SUBRESOURCE},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the exact text of ``crds/rlhfjob.yaml``."""
    header = "# Generated by `rlhfspec crd` from the pydantic models. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def to_json_schema(node: Any, strict: bool = True) -> Any:
    """OpenAPI v3 (structural) -> JSON Schema that ``jsonschema`` can check manifests with.

    ``strict`` adds ``additionalProperties: false`` to every object with known properties,
    mirroring the API server's strict field validation that rejects unknown fields.
    """
    if isinstance(node, list):
        return [to_json_schema(item, strict) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: to_json_schema(v, strict) for k, v in node.items() if not k.startswith("x-kubernetes")
    }
    if out.pop("nullable", False):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if out.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    if "properties" in node and isinstance(node["properties"].get("metadata"), dict):
        # metadata lists only the name's rules; its other fields are ObjectMeta's.
        out["properties"]["metadata"] = to_json_schema(node["properties"]["metadata"], False)
    if strict and "properties" in node and node.get("type") == "object":
        out["additionalProperties"] = False
    return out
