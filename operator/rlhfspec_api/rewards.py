"""The reward contract: how responses are scored (``spec.reward`` or ``spec.rewards``).

Where it sits: ``spec.RLHFJobSpec`` holds one :class:`RewardSpec` (``reward``) or a weighted
list of them (``rewards``); :func:`reward_violations` is the part of its cross-stage check
that concerns rewards. The inference worker builds one scoring function from
``RLHFJobSpec.reward_terms`` (``rlhfspec_workers.rewards.registry``); preflight imports every
function reward before any process starts; the operator mounts a function reward's ConfigMap
into the worker pods. Pure: pydantic only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from rlhfspec_api.base import ContractModel, Float, PlainText, value_error
from rlhfspec_api.echo import echo
from rlhfspec_api.rules import Violation, raise_if_any


class RewardType(StrEnum):
    RULE = "rule"
    MODEL = "model"
    FUNCTION = "function"


class RewardRule(StrEnum):
    MATH_ANSWER = "math_answer"
    EXACT_MATCH = "exact_match"
    REGEX = "regex"
    SORT_DIGITS = "sort_digits"
    FINAL_NUMBER = "final_number"


ANSWER_RULES = frozenset({RewardRule.MATH_ANSWER, RewardRule.EXACT_MATCH, RewardRule.FINAL_NUMBER})
"""Rules that compare the response with the dataset row's answer field."""

FUNCTION_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
"""``package.module:function``: an importable module, a colon, a callable's name."""
FUNCTION_FORMAT = "package.module:function"
CONFIG_MAP_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
MAX_REWARDS = 32
"""Most rewards one job sums; bounded so the CRD's rules over the list have a bounded cost."""
_RULES = ", ".join(r.value for r in RewardRule)


class RewardSpec(ContractModel):
    """One reward: a rule, the reward model, or a user function; several are summed."""

    type: RewardType = RewardType.RULE
    """rule: a built-in checker (``rule``); model: the sequence-classification reward model in
    models.reward; function: a Python callable of yours (``function``)."""
    rule: RewardRule | None = None
    """type rule: which checker. math_answer: the final answer (after ``####``, else the last
    ``\\boxed{}``, else the last number) equals the answer field as a number; exact_match: the
    response equals the answer field (case, surrounding space and trailing punctuation
    ignored); regex: the response matches ``pattern``; sort_digits: the tiny task's exact
    sorted digits; final_number: the last number in the response equals the answer field."""
    pattern: str | None = Field(default=None, min_length=1, max_length=4096)
    """rule regex: a Python regular expression searched in the response (dot matches newline);
    1 when found, else 0 (a format reward)."""
    function: str | None = Field(default=None, max_length=512, pattern=FUNCTION_PATTERN)
    """type function: ``package.module:function``, called as ``fn(prompts, responses, answers,
    metadata)`` with one list entry per response; returns one float per response."""
    weight: Float = Field(default=1.0, ge=-1000.0, le=1000.0)
    """This reward's weight in the sum (rewards listed in ``spec.rewards`` add up)."""
    config_map: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=CONFIG_MAP_PATTERN
    )
    """type function, on a cluster: a ConfigMap in the job's namespace whose keys are module
    files (``my_rewards.py``); mounted into the worker pods and put on PYTHONPATH."""
    name: PlainText | None = Field(default=None, max_length=63)
    """A label for logs and errors (default: the rule, ``model`` or the function)."""

    @field_validator("function", mode="before")
    @classmethod
    def _function_shape(cls, value: object) -> object:
        if isinstance(value, str) and not re.match(FUNCTION_PATTERN, value):
            raise value_error(
                f"{echo(value)} is not {FUNCTION_FORMAT}",
                "a module path, a colon and a callable's name, e.g. my_rewards:score",
            )
        return value

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            re.compile(value)
        except re.error as exc:
            raise value_error(
                f"{echo(value)} is not a valid regular expression: {exc}",
                "a Python regular expression",
            ) from None
        return value

    @property
    def label(self) -> str:
        """How logs and errors name this reward."""
        if self.name:
            return self.name
        if self.type is RewardType.RULE:
            return str(self.rule.value if self.rule else "rule")
        if self.type is RewardType.FUNCTION:
            return self.function or "function"
        return "model"

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> RewardSpec:
        violations: list[Violation] = []
        rule_type = self.type is RewardType.RULE
        if rule_type and self.rule is None:
            violations.append(Violation("rule", "type rule needs a rule", f"one of {_RULES}"))
        if not rule_type and self.rule is not None:
            violations.append(
                Violation(
                    "rule",
                    f"only applies to type rule (type is {self.type.value})",
                    "remove rule, or set type: rule",
                )
            )
        if self.rule is RewardRule.REGEX and self.pattern is None:
            violations.append(
                Violation("pattern", "rule regex needs a pattern", "a Python regular expression")
            )
        if self.pattern is not None and self.rule is not RewardRule.REGEX:
            violations.append(
                Violation(
                    "pattern", "only the regex rule reads a pattern", "remove it, or rule: regex"
                )
            )
        function_type = self.type is RewardType.FUNCTION
        if function_type and self.function is None:
            violations.append(
                Violation("function", "type function needs a function", FUNCTION_FORMAT)
            )
        for field, value in (("function", self.function), ("configMap", self.config_map)):
            if value is not None and not function_type:
                violations.append(
                    Violation(
                        field,
                        f"only applies to type function (type is {self.type.value})",
                        f"remove {field}, or set type: function",
                    )
                )
        raise_if_any(violations)
        return self


def reward_violations(
    reward: RewardSpec | None,
    rewards: Sequence[RewardSpec] | None,
    *,
    has_reward_model: bool,
    answer_field: str | None,
) -> list[Violation]:
    """What is wrong with the job's rewards given the rest of its spec (paths below spec)."""
    if reward is not None and rewards is not None:
        return [
            Violation(
                "rewards",
                "reward and rewards are both given",
                "reward for one reward, or rewards for a weighted sum, not both",
            )
        ]
    terms = named_terms(reward, rewards)
    violations: list[Violation] = []
    for field, term in terms:
        if term.type is RewardType.MODEL and not has_reward_model:
            violations.append(
                Violation(
                    "models.reward",
                    f"{field}.type model needs a reward model",
                    f"set models.reward.path, or {field}.type: rule",
                )
            )
        if term.rule in ANSWER_RULES and answer_field is None:
            violations.append(
                Violation(
                    f"{field}.rule",
                    f"{term.rule} compares with the answer field but dataset.answerField is null",
                    "set dataset.answerField, or a rule that reads no answer: regex, sort_digits",
                )
            )
    names = Counter(term.name for _, term in terms if term.name)
    repeated = sorted(name for name, count in names.items() if count > 1)
    if repeated:
        violations.append(
            Violation(
                "rewards", f"name listed more than once: {', '.join(repeated)}", "unique names"
            )
        )
    return violations


DEFAULT_REWARD = RewardSpec(rule=RewardRule.SORT_DIGITS)
"""The reward of a job that gives neither ``reward`` nor ``rewards`` (the tiny task's rule)."""


def named_terms(
    reward: RewardSpec | None, rewards: Sequence[RewardSpec] | None
) -> list[tuple[str, RewardSpec]]:
    """Every reward with the field naming it below spec (``reward`` or ``rewards[i]``)."""
    if rewards is not None:
        return [(f"rewards[{index}]", term) for index, term in enumerate(rewards)]
    return [("reward", reward if reward is not None else DEFAULT_REWARD.model_copy())]
