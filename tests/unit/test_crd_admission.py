"""The CRD refuses at `kubectl apply` what the validator refuses, and never more.

No API server runs here, so this module plays its admission steps on each manifest, in its
order: prune nulls of non-nullable fields, fill scalar defaults inside objects that are
present, check the openAPIV3Schema (``jsonschema``, strict about unknown fields, patterns
anchored as RE2 anchors them), then evaluate every ``x-kubernetes-validations`` rule with a
real CEL interpreter (``celpy``) on the node that carries it. The verdicts are compared with
``rlhfspec validate``'s on the bad-manifest corpus, the examples and valid variants.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from rlhfspec_api.bounded_yaml import load_all
from rlhfspec_api.crd import build_crd, to_json_schema
from rlhfspec_api.crd_rules import CEL_RESERVED, CRD_RULES
from rlhfspec_api.errors import join_path
from rlhfspec_api.manifest import ManifestError, parse_rlhfjob

ROOT = Path(__file__).resolve().parents[2]
CORPUS = sorted((ROOT / "tests" / "data" / "bad-manifests").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

# Refused by the validator, let through by the CRD, and why. The test fails when this set
# and the measured one differ, so a rule added or lost on either side shows up here.
VALIDATOR_ONLY = {
    # YAML-level refusals: the API server reads JSON/YAML itself and refuses these on its own
    # terms (duplicate keys, alias bombs), or kubectl never sends them.
    "duplicate-key.yaml": "duplicate keys are a YAML-reader refusal",
    "duplicate-key-metadata.yaml": "duplicate keys are a YAML-reader refusal",
    "recursive-alias.yaml": "aliases are a YAML-reader refusal",
    # metadata beyond the name: the API server validates ObjectMeta itself.
    "annotation-value-not-string.yaml": "ObjectMeta is checked by the API server, not the CRD",
    "annotations-not-mapping.yaml": "ObjectMeta is checked by the API server, not the CRD",
    "generate-name-not-string.yaml": "ObjectMeta is checked by the API server, not the CRD",
    "label-key-invalid.yaml": "ObjectMeta is checked by the API server, not the CRD",
    "label-value-invalid.yaml": "ObjectMeta is checked by the API server, not the CRD",
    "label-value-not-string.yaml": "ObjectMeta is checked by the API server, not the CRD",
    "label-value-too-long.yaml": "ObjectMeta is checked by the API server, not the CRD",
    "metadata-unknown-key.yaml": "ObjectMeta is checked by the API server, not the CRD",
    "namespace-invalid.yaml": "ObjectMeta is checked by the API server, not the CRD",
    # JSON has no NaN: kubectl cannot send it, so the API server never sees this document.
    "nan-temperature.yaml": "NaN is not JSON",
    # Patterns state a quantity's grammar, not its amount (at most 2^63-1).
    "memory-40-digits.yaml": "the amount bound is the parser's",
    # Pod template overrides may not touch what the operator owns (names, paths, the security
    # context): those lists live in rlhfspec_api.scheduling and are checked by the validator.
    "override-host-path-volume.yaml": "operator-owned names are checked by the validator",
    "override-mount-over-storage.yaml": "operator-owned paths are checked by the validator",
    "override-operator-label.yaml": "operator-owned labels are checked by the validator",
    "override-secret-key-missing.yaml": "secretKeyRef.key is checked by the validator",
    "override-worker-env.yaml": "operator-owned env names are checked by the validator",
    # Unique reward names need a nested comprehension (see crd_rules' docstring).
    "rewards-duplicate-name.yaml": "reward names are checked by the validator only",
}


@dataclass(frozen=True)
class Refusal:
    field: str
    """Dotted path of the refused field (``spec.algorithm.samplesPerPrompt``)."""
    message: str
    rule: str | None = None
    """The CEL rule that refused, or None for a schema refusal."""


def _schema() -> dict[str, Any]:
    crd = build_crd()
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _re2_anchors(node: Any) -> Any:
    """Python's ``$`` also matches before a final newline; RE2's (the API server's) does not."""
    if isinstance(node, list):
        return [_re2_anchors(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _re2_anchors(value) for key, value in node.items()}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and pattern.endswith("$"):
        out["pattern"] = pattern[:-1] + r"\Z"
    return out


SCHEMA = _schema()
VALIDATOR = jsonschema.Draft202012Validator(_re2_anchors(to_json_schema(SCHEMA)))
CEL = celpy.Environment()
PROGRAMS: dict[str, Any] = {}


def _prune_and_default(value: Any, node: dict[str, Any]) -> Any:
    """The API server's pruning of non-nullable nulls and its scalar defaulting."""
    if isinstance(value, dict) and "properties" in node:
        out = {}
        for key, item in value.items():
            sub = node["properties"].get(key)
            if item is None and sub is not None and not sub.get("nullable"):
                continue
            out[key] = _prune_and_default(item, sub) if sub is not None else item
        for key, sub in node["properties"].items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        return out
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [_prune_and_default(item, node["items"]) for item in value]
    return value


def _cel_view(value: Any) -> Any:
    """Property names as Kubernetes hands them to CEL (keywords escaped)."""
    if isinstance(value, dict):
        return {(f"__{k}__" if k in CEL_RESERVED else k): _cel_view(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cel_view(item) for item in value]
    return value


def _nodes(
    value: Any, node: dict[str, Any], path: str
) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    yield path, value, node
    if isinstance(value, dict):
        for key, sub in node.get("properties", {}).items():
            if key in value and value[key] is not None:
                yield from _nodes(value[key], sub, f"{path}.{key}" if path else key)
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, item in enumerate(value):
            yield from _nodes(item, node["items"], f"{path}[{index}]")


def _evaluate(rule: str, value: Any) -> bool:
    program = PROGRAMS.get(rule)
    if program is None:
        program = PROGRAMS[rule] = CEL.program(CEL.compile(rule))
    result = program.evaluate({"self": json_to_cel(_cel_view(value))})
    if isinstance(result, CELEvalError):
        raise AssertionError(f"CEL error in {rule!r}: {result}")
    return bool(result)


def _out_of_int64(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _out_of_int64(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _out_of_int64(item, f"{path}[{index}]")


def admission(document: Any) -> list[Refusal]:
    """What the API server would refuse in ``document``, one Refusal per failed check."""
    too_large = list(_out_of_int64(document, ""))
    if too_large:
        # The API server decodes JSON numbers into int64 and refuses the request otherwise.
        return [Refusal(path, "integer out of int64 range") for path in too_large]
    obj = _prune_and_default(copy.deepcopy(document), SCHEMA)
    refusals = [
        Refusal(join_path(error.absolute_path), error.message)
        for error in VALIDATOR.iter_errors(obj)
    ]
    if refusals:
        # Rules run on well-typed objects; the API server reports schema errors first.
        return refusals
    for path, value, node in _nodes(obj, SCHEMA, ""):
        for entry in node.get("x-kubernetes-validations", []):
            if not _evaluate(entry["rule"], value):
                field = path + entry.get("fieldPath", "")
                refusals.append(Refusal(field, entry["message"], entry["rule"]))
    return refusals


def validator_fields(document: Any) -> list[str] | None:
    """The fields `rlhfspec validate` names, or None when it accepts the manifest."""
    try:
        parse_rlhfjob(document)
    except ManifestError as exc:
        return [error.path for error in exc.errors]
    return None


def _documents(path: Path) -> list[Any]:
    try:
        return load_all(path.read_text(encoding="utf-8"))
    except Exception:
        return []


VALID_VARIANTS: list[dict[str, Any]] = [
    {"algorithm": {"name": "ppo"}, "models": {"critic": {"path": "tiny://critic"}}},
    {"algorithm": {"promptsPerIteration": 1, "samplesPerPrompt": 2, "microBatchSize": 2}},
    {"rewards": [{"rule": "sort_digits", "name": "a"}, {"rule": "regex", "pattern": "x"}]},
    {"rewards": [{"type": "model"}], "models": {"reward": {"path": "tiny://reward"}}},
    {"rewards": [{"type": "function", "function": "my_rewards:score", "configMap": "fns"}]},
    {
        "coordinator": {
            "mode": "external",
            "url": "rediss://r.example:6380/0",
            "caConfigMap": {"name": "ca"},
            "passwordSecret": {"name": "redis"},
        }
    },
    {
        "generation": {
            "speculative": {
                "mode": "fixed",
                "numDraftTokens": 4,
                "drafters": [{"method": "draft_model", "model": {"path": "tiny://draft"}}],
            }
        }
    },
    {
        "generation": {
            "resources": {"gpu": 1, "cpu": 4, "memory": "16Gi"},
            "speculative": {
                "drafters": [
                    {"method": "eagle", "model": {"path": "tiny://eagle"}},
                    {"method": "ngram", "promptLookupMin": 3},
                ]
            },
        }
    },
    {"generation": {"speculative": {"mode": "off", "drafters": []}}},
    {"dataset": {"path": "tiny://dataset/train.jsonl", "evalFraction": 0.25}},
    {"storage": {"size": "20Gi", "storageClassName": "fast"}},
    {"storage": {"claimName": "shared"}, "reward": {"rule": "sort_digits"}},
    {"models": {"reference": {"path": "/models/ref"}}},
    {
        "dataset": {"path": "tiny://dataset/train.jsonl", "eval": None, "answerField": None},
        "reward": {"rule": "regex", "pattern": "^\\d+$"},
    },
]


def _variant(patch: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "models": {"policy": {"path": "tiny://policy"}},
        "dataset": {"path": "tiny://dataset/train.jsonl"},
    }
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "apiVersion": "rlhfspec.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": "variant"},
        "spec": spec,
    }


def _all_documents() -> list[tuple[str, Any]]:
    cases = [
        (f"{p.name}#{i}", doc) for p in CORPUS + EXAMPLES for i, doc in enumerate(_documents(p))
    ]
    return cases + [(f"variant-{i}", _variant(v)) for i, v in enumerate(VALID_VARIANTS)]


@pytest.mark.parametrize("case", _all_documents(), ids=lambda c: c[0])
def test_crd_never_refuses_what_the_validator_accepts(case: tuple[str, Any]) -> None:
    name, document = case
    if validator_fields(document) is None:
        assert admission(document) == [], name


def test_valid_variants_and_examples_pass_both() -> None:
    for name, document in _all_documents():
        if name.startswith("variant-") or name.split("#")[0] not in {p.name for p in CORPUS}:
            assert validator_fields(document) is None, name
            assert admission(document) == [], name


def test_corpus_refused_by_the_crd_except_the_documented_validator_only_cases() -> None:
    let_through = set()
    for path in CORPUS:
        documents = _documents(path)
        if not documents or all(admission(doc) == [] for doc in documents):
            let_through.add(path.name)
    assert let_through == set(VALIDATOR_ONLY)


def _expected_field(path: Path) -> str:
    return path.read_text(encoding="utf-8").splitlines()[0].removeprefix("# field: ")


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_crd_refusal_points_where_the_validator_does(path: Path) -> None:
    """Where both refuse, one CRD refusal names the corpus file's field (or its parent)."""
    if path.name in VALIDATOR_ONLY:
        return
    field = _expected_field(path)
    refusals = [r for doc in _documents(path) for r in admission(doc)]
    assert refusals, path.name
    fields = [r.field for r in refusals]
    assert any(
        field == f or field.startswith(f + ".") or field.startswith(f + "[") for f in fields
    ), (field, fields)


def test_every_cel_rule_refuses_some_corpus_file_the_validator_refuses_there() -> None:
    fired: dict[str, list[str]] = {}
    for path in CORPUS:
        for document in _documents(path):
            named = validator_fields(document)
            if named is None:
                continue
            for refusal in admission(document):
                if refusal.rule is None:
                    continue
                if any(
                    f == refusal.field
                    or f.startswith(refusal.field + ".")
                    or f.startswith(refusal.field + "[")
                    for f in named
                ):
                    fired.setdefault(refusal.rule, []).append(path.name)
    missing = sorted({rule.rule for rule in CRD_RULES} - set(fired))
    assert missing == [], "rules no corpus file exercises: " + "\n".join(missing)


def test_quantity_pattern_agrees_with_the_parser_on_samples() -> None:
    from rlhfspec_api.quantity import (
        POSITIVE_QUANTITY_PATTERN,
        QuantityError,
        check_positive_quantity,
    )

    pattern = re.compile(POSITIVE_QUANTITY_PATTERN[:-1] + r"\Z")
    samples = [
        "1",
        "500m",
        "8Gi",
        "0",
        "0.0",
        "-1",
        "+2",
        ".5",
        "1e3",
        "1E",
        "1e",
        "0.50",
        "00",
        "1.",
        "Gi",
        "1Gib",
        "0e5",
        "1e-3",
        "1Gi\n",
        " 1",
        "1 ",
        "2k",
        "3Ki",
    ]
    for text in samples:
        try:
            check_positive_quantity(text)
            parsed = True
        except QuantityError:
            parsed = False
        assert bool(pattern.match(text)) == parsed, text


def _fuzz(alphabet: str, count: int, seed: int) -> Iterator[str]:
    import random

    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))


@pytest.mark.parametrize(
    ("pattern_name", "check_name", "samples", "alphabet"),
    [
        (
            "IMAGE_PATTERN",
            "image_reference",
            [
                "ghcr.io/rlhfspec/worker-cpu:0.1.0",
                "redis:7.4-alpine",
                "localhost:5000/a/b_c:x",
                "a@sha256:" + "0" * 64,
                "Registry.Example:443/x__y/z--w:T.1",
                "[::1]:5000/img",
            ],
            "ab.:/@-_A0s1ha2567x",
        ),
        (
            "REDIS_URL_PATTERN",
            "redis_url",
            [
                "redis://redis:6379/0",
                "rediss://r.example",
                "redis://10.0.0.1:06379/",
                "redis://[::1]:65535/15",
                "redis://Host.Example:1",
            ],
            "redis:/.0123456789[]@h-",
        ),
        (
            "SECRET_KEY_PATTERN",
            "secret_key",
            ["password", ".env", "a..b", "-_.x", "ca.crt"],
            "a.-_9/",
        ),
        ("DNS_SUBDOMAIN_PATTERN", "dns_subdomain", ["a", "a-b.c", "0.x-1"], "a0-.A"),
    ],
)
def test_crd_patterns_accept_everything_the_python_checks_accept(
    pattern_name: str, check_name: str, samples: list[str], alphabet: str
) -> None:
    from rlhfspec_api import formats

    pattern = re.compile(getattr(formats, pattern_name)[:-1] + r"\Z")
    check = getattr(formats, check_name)
    accepted = 0
    for text in [*samples, *_fuzz(alphabet, 20000, seed=len(alphabet))]:
        if check(text) is None:
            accepted += 1
            assert pattern.match(text), text
    assert accepted >= len(samples)
