"""Shared base model and small value types for the RLHFJob contract.

Where it sits: imported by ``spec`` and ``status``. Kubernetes objects are camelCase, Python is
snake_case; the base model maps one onto the other, forbids unknown fields (a typo must never
be silently ignored) and turns field docstrings into schema descriptions, which the CRD
generator copies into the openAPIV3Schema that ``kubectl explain`` shows.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

# ctx key carrying the list of cross-field violations of one model (see ``rule_errors``).
RULES_ERROR_TYPE = "rlhfspec_rules"
# Error type of a single-field check that knows what is allowed (ctx: problem, allowed).
VALUE_ERROR_TYPE = "rlhfspec_value"


def value_error(problem: str, allowed: str) -> PydanticCustomError:
    """A field-level validation error carrying both what is wrong and what is allowed."""
    return PydanticCustomError(
        VALUE_ERROR_TYPE, "{problem} ({allowed})", {"problem": problem, "allowed": allowed}
    )


class ContractModel(BaseModel):
    """Base of every spec/status model: camelCase on the wire, strict about unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=False,
        frozen=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase keys, no unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def _quantity(value: object) -> str:
    """Kubernetes resource quantities arrive as int or string ("2", 2, "500m", "8Gi")."""
    allowed = "a Kubernetes quantity such as 2, 500m, 8Gi"
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _QUANTITY.match(value):
        raise value_error(f"{value!r} is not a resource quantity", allowed)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes resource quantity (``2``, ``500m``, ``8Gi``)."""
