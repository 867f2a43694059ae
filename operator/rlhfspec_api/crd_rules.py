"""Cross-field rules the API server enforces: CEL ``x-kubernetes-validations`` of the CRD.

Where it sits: ``crd`` attaches :data:`CRD_RULES` to the schema of the model each rule names
(every place that model appears, since ``$ref``s are inlined), so ``kubectl apply`` refuses
a manifest the operator would refuse later anyway. The ``model_validator``s in ``spec``,
``generation``, ``rewards`` and ``models`` stay the authority, run on every parse and give the
richer message; each rule here restates one of them in CEL. ``tests/unit/test_crd_admission``
evaluates every rule on the bad-manifest corpus and checks the two agree: a manifest the
validator accepts is never refused by a rule, and each rule refuses at least one corpus file
the validator refuses at the same field.

How a rule reads an optional field: the API server fills scalar defaults only inside
objects the user wrote, and an absent object has no fields, so :func:`value_or_default`
guards every step with ``has()`` and falls back to the model's own default. Explicit nulls
of fields whose default is null are pruned by the API server before rules run (``crd``
leaves those fields non-nullable), so ``has()`` means "set" exactly as ``is not None`` does.

Validator-only rules (CEL cannot restate them faithfully):

* a reward rule that compares with the answer field while ``dataset.answerField`` is null:
  that field is nullable with a non-null default, and whether ``has()`` sees an explicit
  null differs between API server versions;
* Python regular expressions that do not compile (``rewards[].pattern``): CEL's ``matches``
  uses RE2, a different dialect;
* reward names unique across ``spec.rewards``: it needs a comprehension nested in another
  that reads the outer variable, which the CEL interpreter the tests check rules with
  evaluates wrongly, and a rule is only shipped when its test can run it (drafter methods,
  a closed set, are checked one method at a time instead);
* amounts of quantities (at most 2^63-1): the pattern states the grammar only;
* everything about ``metadata`` beyond the name (label and annotation grammar: the API
  server checks those itself).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel

from rlhfspec_api.generation import (
    MODEL_BASED_DRAFTERS,
    REFRESHABLE_DRAFTERS,
    DrafterMethod,
    DrafterSpec,
    DraftRefreshSpec,
    SpeculativeSpec,
)
from rlhfspec_api.models import MODEL_URI_SCHEMES, ModelRef, Resources
from rlhfspec_api.rewards import RewardSpec
from rlhfspec_api.spec import (
    CRITIC_ALGORITHMS,
    GROUP_ALGORITHMS,
    DatasetSpec,
    RLHFJobSpec,
    StorageSpec,
)

# Kubernetes escapes property names that are CEL keywords: ``function`` is ``__function__``.
CEL_RESERVED = frozenset(
    {
        "true",
        "false",
        "null",
        "in",
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    }
)


@dataclass(frozen=True)
class CrdRule:
    """One ``x-kubernetes-validations`` entry on the schema of ``model``."""

    model: type[BaseModel]
    """The model whose schema node carries the rule; ``self`` in the rule is that object."""
    rule: str
    """The CEL expression; true means valid."""
    message: str
    """What the API server prints when the rule is false."""
    field_path: str = ""
    """JSONPath below ``self`` of the field the message is about (``.algorithm.name``)."""

    def entry(self) -> dict[str, str]:
        """The rule as the CRD writes it."""
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
            out["reason"] = "FieldValueInvalid"
        return out


def cel_name(name: str) -> str:
    """A property name as CEL sees it (keywords escaped the Kubernetes way)."""
    return f"__{name}__" if name in CEL_RESERVED else name


def cel_literal(value: object) -> str:
    """A Python default as a CEL literal."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"no CEL literal for {value!r}")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field(model: type[BaseModel], step: str) -> tuple[str, Any]:
    """(python name, FieldInfo) of the field called ``step`` on the wire (or in Python)."""
    for name, info in model.model_fields.items():
        if step in (name, info.alias):
            return name, info
    raise KeyError(f"{model.__name__} has no field {step}")


def model_default(model: type[BaseModel], path: str) -> object:
    """The value ``path`` (dotted camelCase) has when the user leaves it out.

    One fallback serves both "the parent object is absent" and "the parent is there without
    this field", so the parent's default object must agree with its class defaults below;
    a ValueError says when a model change breaks that.
    """
    steps = path.split(".")
    current: type[BaseModel] | None = model
    for index, step in enumerate(steps):
        if current is None:
            raise TypeError(f"{path}: {steps[index - 1]} is not an object")
        _, info = _field(current, step)
        default = info.get_default(call_default_factory=True)
        if index == len(steps) - 1:
            return default
        nested = _model_of(info.annotation)
        if isinstance(default, BaseModel) and nested is not None:
            rest = ".".join(steps[index + 1 :])
            held: Any = default
            for inner in rest.split("."):
                held = getattr(held, _field(type(held), inner)[0])
            if held != model_default(nested, rest):
                raise ValueError(f"{path}: the default {step} object disagrees with its class")
        current = nested
    raise AssertionError("unreachable")


def value_or_default(model: type[BaseModel], path: str, root: str = "self") -> str:
    """CEL for the value at ``path`` below ``root``, or the model's default when unset."""
    fallback = cel_literal(model_default(model, path))
    steps = [cel_name(step) for step in path.split(".")]
    # has(a.b) on an absent a is an error in CEL, not false: guard every step.
    return f"({present(path, root)} ? {root}.{'.'.join(steps)} : {fallback})"


def present(path: str, root: str = "self") -> str:
    """CEL that is true when the optional ``path`` is set, guarding each parent."""
    steps = [cel_name(step) for step in path.split(".")]
    guards = [f"has({root}.{'.'.join(steps[: i + 1])})" for i in range(len(steps))]
    return "(" + " && ".join(guards) + ")"


def _in(values: object) -> str:
    return "[" + ", ".join(cel_literal(v) for v in typing.cast(Any, values)) + "]"


def _spec_rules() -> list[CrdRule]:
    name = value_or_default(RLHFJobSpec, "algorithm.name")
    samples = value_or_default(RLHFJobSpec, "algorithm.samplesPerPrompt")
    prompts = value_or_default(RLHFJobSpec, "algorithm.promptsPerIteration")
    per_iteration = f"{prompts} * {samples}"
    mode = value_or_default(RLHFJobSpec, "coordinator.mode")
    drafters = "self.generation.speculative.drafters"
    return [
        CrdRule(
            RLHFJobSpec,
            f"!({name} in {_in(sorted(CRITIC_ALGORITHMS))}) || has(self.models.critic)",
            "this algorithm needs a critic model: set models.critic.path",
            ".models.critic",
        ),
        CrdRule(
            RLHFJobSpec,
            f"!({name} in {_in(sorted(GROUP_ALGORITHMS))}) || {samples} >= 2",
            "this algorithm compares samples within a group: at least 2 samples per prompt",
            ".algorithm.samplesPerPrompt",
        ),
        CrdRule(
            RLHFJobSpec,
            f"{value_or_default(RLHFJobSpec, 'algorithm.microBatchSize')} <= {per_iteration}",
            "microBatchSize exceeds the samples per iteration (promptsPerIteration x "
            "samplesPerPrompt)",
            ".algorithm.microBatchSize",
        ),
        CrdRule(
            RLHFJobSpec,
            f"{value_or_default(RLHFJobSpec, 'algorithm.miniBatches')} <= {per_iteration}",
            "miniBatches exceeds the samples per iteration (promptsPerIteration x "
            "samplesPerPrompt)",
            ".algorithm.miniBatches",
        ),
        CrdRule(
            RLHFJobSpec,
            "!(has(self.reward) && has(self.rewards))",
            "reward and rewards are both given: reward for one, rewards for a weighted sum",
            ".rewards",
        ),
        CrdRule(
            RLHFJobSpec,
            "has(self.models.reward) || ("
            f"(!has(self.reward) || {value_or_default(RewardSpec, 'type', 'self.reward')}"
            " != 'model') && (!has(self.rewards) || self.rewards.all(r, "
            f"{value_or_default(RewardSpec, 'type', 'r')} != 'model')))",
            "a reward of type model needs a reward model: set models.reward.path",
            ".models.reward",
        ),
        CrdRule(
            RLHFJobSpec,
            f"{mode} != 'external' || {present('coordinator.url')}",
            "external mode needs a Redis URL: coordinator.url",
            ".coordinator.url",
        ),
        CrdRule(
            RLHFJobSpec,
            f"!{present('coordinator.caConfigMap')} || ({present('coordinator.url')} && "
            "self.coordinator.url.startsWith('rediss://'))",
            "caConfigMap verifies a TLS server: it needs a rediss:// coordinator.url",
            ".coordinator.caConfigMap",
        ),
        CrdRule(
            RLHFJobSpec,
            f"{mode} != 'managed' || (!{present('coordinator.url')} && "
            f"!{present('coordinator.passwordSecret')})",
            "managed mode runs its own Redis: remove url and passwordSecret, or mode: external",
            ".coordinator.url",
        ),
        CrdRule(
            RLHFJobSpec,
            f"!{present('generation.speculative.drafters')} || "
            f"{drafters}.all(d, d.method != 'eagle') || "
            f"{value_or_default(RLHFJobSpec, 'generation.resources.gpu')} >= 1",
            "eagle runs only on GPU generation pods: set generation.resources.gpu >= 1",
            ".generation.speculative.drafters",
        ),
    ]


def _part_rules() -> list[CrdRule]:
    model_based = _in(sorted(m.value for m in MODEL_BASED_DRAFTERS))
    refreshable = _in(sorted(m.value for m in REFRESHABLE_DRAFTERS))
    lookup_min = value_or_default(DrafterSpec, "promptLookupMin")
    lookup_max = value_or_default(DrafterSpec, "promptLookupMax")
    spec_mode = value_or_default(SpeculativeSpec, "mode")
    reward_type = value_or_default(RewardSpec, "type")
    schemes = "|".join(MODEL_URI_SCHEMES)
    return [
        CrdRule(
            DatasetSpec,
            "!(has(self.eval) && has(self.evalFraction))",
            "eval and evalFraction both name a held-out split: set one",
            ".evalFraction",
        ),
        CrdRule(
            StorageSpec,
            "[has(self.claimName), has(self.size), has(self.path)].filter(x, x).size() == 1",
            "exactly one of claimName, size, path is needed",
        ),
        CrdRule(
            StorageSpec,
            "!has(self.storageClassName) || has(self.size)",
            "storageClassName only applies to a created claim: set size",
            ".storageClassName",
        ),
        CrdRule(
            ModelRef,
            "!self.path.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://') || "
            f"self.path.matches('^({schemes})://[\\\\s\\\\S]')",
            f"path: a filesystem path, or a URI with scheme {', '.join(MODEL_URI_SCHEMES)} "
            "naming a model",
            ".path",
        ),
        CrdRule(
            DrafterSpec,
            f"!(self.method in {model_based}) || has(self.model)",
            "draft_model and eagle need a draft model: set model.path",
            ".model",
        ),
        CrdRule(
            DrafterSpec,
            f"self.method in {model_based} || !has(self.model)",
            "ngram, suffix and suffix_tree are model-free and take no model",
            ".model",
        ),
        CrdRule(
            DrafterSpec,
            f"!has(self.refresh) || self.method in {refreshable}",
            "refresh applies to method draft_model only (the others have no model the draft "
            "builder distils)",
            ".refresh",
        ),
        CrdRule(
            DraftRefreshSpec,
            "has(self.every) || has(self.onAcceptanceBelow)",
            "a refresh needs a trigger: set every, onAcceptanceBelow, or both",
            ".every",
        ),
        CrdRule(
            DrafterSpec,
            f"{lookup_min} <= {lookup_max}",
            "promptLookupMin must not exceed promptLookupMax",
            ".promptLookupMin",
        ),
        CrdRule(
            SpeculativeSpec,
            f"{spec_mode} == 'off' || !has(self.drafters) || size(self.drafters) > 0",
            "adaptive and fixed modes need at least one drafter (or mode: off)",
            ".drafters",
        ),
        CrdRule(
            SpeculativeSpec,
            f"{spec_mode} != 'fixed' || !has(self.drafters) || size(self.drafters) <= 1",
            "mode fixed uses exactly one drafter",
            ".drafters",
        ),
        CrdRule(
            SpeculativeSpec,
            "!has(self.drafters) || "
            + " && ".join(
                f"self.drafters.filter(d, d.method == {cel_literal(method)}).size() <= 1"
                for method in DrafterMethod
            ),
            "drafters: each method at most once",
            ".drafters",
        ),
        CrdRule(
            SpeculativeSpec,
            f"!has(self.numDraftTokens) || ({spec_mode} == 'fixed' && self.numDraftTokens <= "
            f"{value_or_default(SpeculativeSpec, 'maxDraftTokens')})",
            "numDraftTokens: only in mode fixed, at most maxDraftTokens",
            ".numDraftTokens",
        ),
        CrdRule(
            RewardSpec,
            f"({reward_type} == 'rule') == has(self.rule)",
            "rule: required for type rule, not allowed for other types",
            ".rule",
        ),
        CrdRule(
            RewardSpec,
            "(has(self.rule) && self.rule == 'regex') == has(self.pattern)",
            "pattern: required for rule regex, not allowed otherwise",
            ".pattern",
        ),
        CrdRule(
            RewardSpec,
            f"({reward_type} == 'function') == has(self.{cel_name('function')})",
            "function: required for type function, not allowed for other types",
            ".function",
        ),
        CrdRule(
            RewardSpec,
            f"{reward_type} == 'function' || !has(self.configMap)",
            "configMap only applies to type function",
            ".configMap",
        ),
    ]


def _quantity_rules() -> list[CrdRule]:
    # Quantities are int-or-string: the pattern checks strings, this checks integers.
    return [
        CrdRule(
            model,
            f"!has(self.{name}) || type(self.{name}) != int || self.{name} > 0",
            f"{name} must be greater than 0",
            f".{name}",
        )
        for model, name in ((Resources, "cpu"), (Resources, "memory"), (StorageSpec, "size"))
    ]


CRD_RULES: tuple[CrdRule, ...] = (*_spec_rules(), *_part_rules(), *_quantity_rules())
"""Every CEL rule of the CRD, in the order the CRD lists them."""


def rules_by_model() -> dict[str, list[dict[str, str]]]:
    """Schema title (the model's class name) -> its ``x-kubernetes-validations``."""
    out: dict[str, list[dict[str, str]]] = {}
    for rule in CRD_RULES:
        out.setdefault(rule.model.__name__, []).append(rule.entry())
    return out
