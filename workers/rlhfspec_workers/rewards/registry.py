"""The reward registry: the job's reward terms -> one scoring function (their weighted sum).

Where it sits: ``inference.experience.ExperienceMaker`` calls :func:`build_reward` once with
``RLHFJobSpec.named_reward_terms`` and scores every batch of rollouts with the result. Each
term is a rule (a pure function of the response, the answer or the prompt, scored 0 for a
response cut off by maxNewTokens), the reward model, or a user function; the sum weights each
term by its ``weight``. A term that cannot score raises :class:`RewardError` naming its field.
Importing this module imports no torch (only a model reward loads ``model``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfspec_api.rewards import RewardRule, RewardSpec, RewardType
from rlhfspec_workers.messages import Rollout

from . import exact_match, final_number, math_answer, regex, sort_digits
from .base import RewardError, RewardFunction, unfinished
from .function import FunctionReward

RuleScore = Callable[[Rollout], float]


def _rule_scorer(term: RewardSpec) -> RuleScore:
    rule = term.rule
    if rule is RewardRule.MATH_ANSWER:
        return lambda r: math_answer.score(r.text, r.answer)
    if rule is RewardRule.EXACT_MATCH:
        return lambda r: exact_match.score(r.text, r.answer)
    if rule is RewardRule.REGEX:
        pattern = regex.compile_pattern(term.pattern or "")
        return lambda r: regex.score(r.text, pattern)
    if rule is RewardRule.SORT_DIGITS:
        return lambda r: sort_digits.score(r.prompt, r.text)
    if rule is RewardRule.FINAL_NUMBER:
        return lambda r: final_number.score(r.text, r.answer)
    known = ", ".join(r.value for r in RewardRule)
    raise ValueError(f"unknown reward rule {rule!r}; known: {known}")


class RuleReward:
    """A rule over a batch: the rule's score of each rollout, 0 for a cut-off response."""

    def __init__(self, term: RewardSpec) -> None:
        self.rule = term.rule
        self.score_one = _rule_scorer(term)

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        return [0.0 if unfinished(r) else self.score_one(r) for r in rollouts]


def rule_reward(rule: RewardRule, pattern: str | None = None) -> RuleReward:
    """The batch scorer of one rule (``pattern``: the regex rule's)."""
    return RuleReward(RewardSpec(rule=rule, pattern=pattern))


def model_path(models: Mapping[str, Path], name: str) -> Path | None:
    """``models[spec.models.<name>]`` (also accepts the ``models.<name>`` spelling)."""
    for key in (f"spec.models.{name}", f"models.{name}", name):
        if key in models:
            return Path(models[key])
    return None


@dataclass(frozen=True)
class Term:
    """One weighted reward of the sum."""

    field: str
    """The spec field naming it (``spec.reward``, ``spec.rewards[1]``)."""
    label: str
    weight: float
    score: RewardFunction


def build_term(
    field: str,
    term: RewardSpec,
    models: Mapping[str, Path],
    device: Any = None,
    batch_size: int = 64,
) -> RewardFunction:
    """The scorer of one reward term. ``device``: the torch device a model reward runs on."""
    if term.type is RewardType.RULE:
        return RuleReward(term)
    if term.type is RewardType.FUNCTION:
        return FunctionReward(term.function or "", f"{field}.function")
    path = model_path(models, "reward")
    if path is None:
        raise RewardError("spec.models.reward", f"{field}.type model needs models.reward")
    from .model import ModelReward  # torch: only for jobs with a model reward

    return ModelReward(path, device, batch_size)


class WeightedReward:
    """The job's reward: the weighted sum of its terms' scores, one float per rollout."""

    def __init__(self, terms: Sequence[Term]) -> None:
        if not terms:
            raise ValueError("a reward needs at least one term")
        self.terms = list(terms)

    def by_term(self, rollouts: Sequence[Rollout]) -> dict[str, list[float]]:
        """Each term's unweighted scores, keyed by its field."""
        out: dict[str, list[float]] = {}
        for term in self.terms:
            scores = [float(s) for s in term.score(rollouts)] if rollouts else []
            if len(scores) != len(rollouts):
                raise RewardError(
                    term.field,
                    f"{term.label} scored {len(scores)} of {len(rollouts)} responses",
                )
            bad = next((s for s in scores if not math.isfinite(s)), None)
            if bad is not None:
                raise RewardError(term.field, f"{term.label} scored a response {bad}")
            out[term.field] = scores
        return out

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        totals = [0.0] * len(rollouts)
        for term, scores in zip(self.terms, self.by_term(rollouts).values(), strict=True):
            for index, value in enumerate(scores):
                totals[index] += term.weight * value
        return totals


def build_reward(
    terms: Sequence[tuple[str, RewardSpec]],
    models: Mapping[str, Path],
    device: Any = None,
    batch_size: int = 64,
) -> WeightedReward:
    """The job's reward from ``RLHFJobSpec.named_reward_terms``; ``models`` maps field paths
    (``spec.models.x``) to model dirs, as in ``preflight.ResolvedPaths.models``. A function
    that does not import raises RewardError here."""
    built = [
        Term(field, term.label, term.weight, build_term(field, term, models, device, batch_size))
        for field, term in terms
    ]
    return WeightedReward(built)
