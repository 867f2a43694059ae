"""Shared base model and small value types for the RLHFJob contract.

Where it sits: imported by ``spec`` and ``status``. Kubernetes objects are camelCase, Python is
snake_case; the base model maps one onto the other, forbids unknown fields (a typo must never
be silently ignored) and turns field docstrings into schema descriptions, which the CRD
generator copies into the openAPIV3Schema that ``kubectl explain`` shows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from rlhfspec_api import formats
from rlhfspec_api.echo import echo
from rlhfspec_api.quantity import (
    MAX_QUANTITY_LENGTH,
    POSITIVE_QUANTITY_PATTERN,
    QuantityError,
    check_positive_quantity,
)

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


_QUANTITY_ALLOWED = "a Kubernetes quantity such as 2, 500m, 8Gi"


def _quantity(value: object) -> str:
    """Kubernetes resource quantities arrive as int or string ("2", 2, "500m", "8Gi").

    The CRD types them int-or-string, so floats and booleans are refused as the API server
    refuses them. The amount must be above 0 and fit in 64 bits.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 64:
            raise value_error(
                f"{echo(value)} is not a usable quantity: too large", _QUANTITY_ALLOWED
            )
        value = str(value)
    if not isinstance(value, str):
        raise value_error(f"{echo(value)} is not a resource quantity", _QUANTITY_ALLOWED)
    try:
        check_positive_quantity(value)
    except QuantityError as exc:
        if str(exc) == "not a quantity":
            raise value_error(
                f"{echo(value)} is not a resource quantity", _QUANTITY_ALLOWED
            ) from None
        raise value_error(
            f"{echo(value)} is not a usable quantity: {exc}", _QUANTITY_ALLOWED
        ) from None
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            # Applies to the string form; crd_rules checks the integer form is above 0.
            "pattern": POSITIVE_QUANTITY_PATTERN,
            "maxLength": MAX_QUANTITY_LENGTH,
        }
    ),
]
"""A Kubernetes resource quantity (``2``, ``500m``, ``8Gi``), greater than 0."""

# Kubernetes decodes manifests as JSON into typed fields: "4" is no integer there and "yes"
# no boolean. Strict fields refuse what pydantic's lax mode would coerce; a float field still
# takes an integer (JSON has one number type), never a boolean, NaN or infinity.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]


def _checked(check: Callable[[str], str | None], allowed: str) -> AfterValidator:
    def validate(value: str) -> str:
        problem = check(value)
        if problem is not None:
            raise value_error(f"{echo(value)} {problem}", allowed)
        return value

    return AfterValidator(validate)


MAX_PATH_CHARS = 4096
NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"


def _pattern(pattern: str) -> dict[str, Any]:
    """The CRD's ``pattern`` for a string type whose Python check is richer.

    Only the schema carries it (the ``_checked`` validator stays the authority and gives the
    message); each pattern accepts everything its check accepts, so the API server refuses
    early and never refuses what the operator would run.
    """
    return {"pattern": pattern}


PathText = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=MAX_PATH_CHARS, json_schema_extra=_pattern(NO_CONTROL)),
    _checked(formats.control_characters, "a path or URI without control characters"),
]
"""A file path or URI (control characters, NUL included, are refused)."""
PlainText = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=MAX_PATH_CHARS, json_schema_extra=_pattern(NO_CONTROL)),
    _checked(formats.control_characters, "text without control characters"),
]
"""A name or key read by the workers (dataset fields, labels)."""
ImageRef = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=512, json_schema_extra=_pattern(formats.IMAGE_PATTERN)),
    _checked(formats.image_reference, "an image reference [registry/]repository[:tag][@digest]"),
]
"""A container image reference, e.g. ``ghcr.io/org/worker:1.0``."""
RedisUrl = Annotated[
    str,
    Strict(),
    Field(max_length=1024, json_schema_extra=_pattern(formats.REDIS_URL_PATTERN)),
    _checked(formats.redis_url, "redis://host[:port][/db] or rediss://..."),
]
"""A Redis URL without credentials."""
DnsSubdomain = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=253, json_schema_extra=_pattern(formats.DNS_SUBDOMAIN_PATTERN)),
    _checked(formats.dns_subdomain, "lowercase letters, digits, '-' and '.', at most 253"),
]
"""A Kubernetes object name (Secret, ConfigMap, PersistentVolumeClaim, StorageClass)."""
SecretKey = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=253, json_schema_extra=_pattern(formats.SECRET_KEY_PATTERN)),
    _checked(formats.secret_key, "letters, digits, '-', '_' and '.', at most 253"),
]
"""A key of a Secret's data."""
