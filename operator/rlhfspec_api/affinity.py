"""Kubernetes scheduling value types a pod template override may carry: label maps, affinity.

Where it sits: used by ``scheduling`` (the ``podTemplateOverrides`` models). These mirror the
Kubernetes API's own shapes (``Affinity``, ``NodeSelectorTerm``, ``PodAffinityTerm``,
``LabelSelector``) field for field, so a user copies them from a Deployment unchanged; they
are typed here, not passed through as free-form objects, so a typo fails ``rlhfspec
validate`` instead of a pod create on the cluster.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, Field, WithJsonSchema

from rlhfspec_api import formats
from rlhfspec_api.base import ContractModel, Int, PlainText, value_error
from rlhfspec_api.echo import echo, key_text

MAX_MAP_ENTRIES = 256
KEY_ALLOWED = (
    "[prefix/]name: a DNS subdomain prefix, a name of at most 63 letters, digits, '-', '_' "
    "and '.' starting and ending alphanumeric"
)
VALUE_ALLOWED = (
    "empty, or at most 63 letters, digits, '-', '_' and '.' starting and ending alphanumeric"
)


def _label_map(values: dict[str, str]) -> dict[str, str]:
    for key, value in values.items():
        if formats.label_key(key) is not None:
            raise value_error(f"key {echo(key)} is not a valid label key", KEY_ALLOWED)
        if (problem := formats.label_value(value)) is not None:
            raise value_error(f"{key_text(key)}: {echo(value)} {problem}", VALUE_ALLOWED)
    return values


def _annotation_map(values: dict[str, str]) -> dict[str, str]:
    for key in values:
        if formats.label_key(key) is not None:
            raise value_error(f"key {echo(key)} is not a valid annotation key", KEY_ALLOWED)
    return values


# The CRD generator keeps a schema-valued additionalProperties: a map of strings.
_STRING_MAP_SCHEMA = WithJsonSchema({"type": "object", "additionalProperties": {"type": "string"}})
LabelMap = Annotated[
    dict[str, str],
    Field(max_length=MAX_MAP_ENTRIES),
    AfterValidator(_label_map),
    _STRING_MAP_SCHEMA,
]
"""Label keys and values as Kubernetes accepts them (also a nodeSelector)."""
AnnotationMap = Annotated[
    dict[str, str],
    Field(max_length=MAX_MAP_ENTRIES),
    AfterValidator(_annotation_map),
    _STRING_MAP_SCHEMA,
]
"""Annotation keys as Kubernetes accepts them, any string values."""

Values = Annotated[list[PlainText], Field(max_length=MAX_MAP_ENTRIES)]


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class NodeSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"
    GT = "Gt"
    LT = "Lt"


class LabelSelectorRequirement(ContractModel):
    """One expression of a label selector."""

    key: PlainText
    """The label key the selector applies to."""
    operator: SelectorOperator
    """In, NotIn, Exists or DoesNotExist."""
    values: Values | None = None
    """Values for In and NotIn."""


class LabelSelector(ContractModel):
    """Pods whose labels match every entry of matchLabels and every expression."""

    match_labels: LabelMap | None = None
    """Labels a pod must carry with exactly these values."""
    match_expressions: list[LabelSelectorRequirement] | None = Field(default=None, max_length=64)
    """Expressions a pod's labels must satisfy."""


class NodeSelectorRequirement(ContractModel):
    """One expression over a node's labels or fields."""

    key: PlainText
    """The label (or field) key."""
    operator: NodeSelectorOperator
    """In, NotIn, Exists, DoesNotExist, Gt or Lt."""
    values: Values | None = None
    """Values for In, NotIn (any), Gt and Lt (one integer)."""


class NodeSelectorTerm(ContractModel):
    """Nodes matching every expression of the term."""

    match_expressions: list[NodeSelectorRequirement] | None = Field(default=None, max_length=64)
    """Expressions over node labels."""
    match_fields: list[NodeSelectorRequirement] | None = Field(default=None, max_length=64)
    """Expressions over node fields (metadata.name)."""


class NodeSelector(ContractModel):
    """Nodes matching any of the terms."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=64)
    """The terms, ORed."""


class PreferredSchedulingTerm(ContractModel):
    """A weighted node preference."""

    weight: Int = Field(ge=1, le=100)
    """1..100, added to a node's score when it matches."""
    preference: NodeSelectorTerm
    """The nodes preferred."""


class NodeAffinity(ContractModel):
    """Which nodes the pod may (required) or would rather (preferred) run on."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Nodes the pod must run on."""
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = (
        Field(default=None, max_length=64)
    )
    """Nodes the scheduler prefers."""


class PodAffinityTerm(ContractModel):
    """Pods matched by labelSelector (in namespaces) on the same topology domain."""

    label_selector: LabelSelector | None = None
    """The pods this term is about."""
    topology_key: PlainText
    """Node label defining the domain, e.g. kubernetes.io/hostname."""
    namespaces: Values | None = None
    """Namespaces of the matched pods (default: the job's)."""
    namespace_selector: LabelSelector | None = None
    """Namespaces of the matched pods, by label."""


class WeightedPodAffinityTerm(ContractModel):
    """A weighted pod (anti-)affinity preference."""

    weight: Int = Field(ge=1, le=100)
    """1..100, added to a node's score when the term holds."""
    pod_affinity_term: PodAffinityTerm
    """The term."""


class PodAffinity(ContractModel):
    """Pods this pod must (required) or would rather (preferred) run near, or away from."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        default=None, max_length=64
    )
    """Terms that must hold."""
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = (
        Field(default=None, max_length=64)
    )
    """Terms the scheduler prefers."""


class Affinity(ContractModel):
    """The pod's affinity, as in a Kubernetes pod spec."""

    node_affinity: NodeAffinity | None = None
    """Node affinity."""
    pod_affinity: PodAffinity | None = None
    """Run near pods matching these terms."""
    pod_anti_affinity: PodAffinity | None = None
    """Run away from pods matching these terms (e.g. one generation pod per node)."""
