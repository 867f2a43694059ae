"""Cross-field rules: how a model validator reports several violations at once.

Where it sits: used by the ``model_validator``s in ``spec``. Pydantic stops a model at its
first raised error; RLHFJob users want every problem in one pass, each pinned to the field
to change. A validator collects :class:`Violation`s and raises them together; the formatter
in ``manifest`` expands them into one ``field.path: what is wrong (what is allowed)`` line each.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic_core import PydanticCustomError

from rlhfspec_api.base import RULES_ERROR_TYPE


@dataclass(frozen=True)
class Violation:
    """One broken rule, relative to the model that checked it."""

    field: str
    """Dotted camelCase path below the validating model, e.g. ``models.critic``."""
    problem: str
    """What is wrong, e.g. ``ppo needs a critic model``."""
    allowed: str
    """What would be accepted, e.g. ``set models.critic.path``."""


def raise_if_any(violations: list[Violation]) -> None:
    """Raise all violations as one pydantic error (no-op when the list is empty)."""
    if not violations:
        return
    summary = "; ".join(f"{v.field}: {v.problem}" for v in violations)
    raise PydanticCustomError(
        RULES_ERROR_TYPE,
        "{summary}",
        {"summary": summary, "violations": [(v.field, v.problem, v.allowed) for v in violations]},
    )
