"""Turn pydantic validation errors into ``field.path: what is wrong (what is allowed)`` lines.

Where it sits: ``manifest.parse_rlhfjob`` catches ``ValidationError`` from the spec models and
calls :func:`field_errors`. Pydantic's own messages say what is wrong but rarely what is
allowed, and its paths are tuples; users of ``rlhfspec validate``, of the operator's
ValidationFailed condition and of local mode all get the same lines from here.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from rlhfspec_api.base import RULES_ERROR_TYPE, VALUE_ERROR_TYPE
from rlhfspec_api.echo import echo, key_text


@dataclass(frozen=True)
class FieldError:
    """One problem with a manifest, pinned to the field to change."""

    path: str
    problem: str
    allowed: str = ""

    def __str__(self) -> str:
        suffix = f" ({self.allowed})" if self.allowed else ""
        return f"{self.path}: {self.problem}{suffix}"


def join_path(parts: typing.Iterable[str | int]) -> str:
    """``("spec", "drafters", 0, "method")`` -> ``spec.drafters[0].method``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            # Keys are user input too: cut and escaped, or one key could fill the line.
            text = key_text(str(part))
            out += f".{text}" if out else text
    return out


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _constraints(info: FieldInfo) -> list[Any]:
    """The field's constraints, with those of an Annotated type inside ``X | None``.

    Pydantic lifts the constraints of ``Annotated[int, ...]`` into the field, but not when
    the Annotated type sits inside an Optional (``Int | None``, ``RedisUrl | None``).
    """
    found: list[Any] = list(info.metadata)
    annotation = info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is typing.Annotated:
                for meta in typing.get_args(arg)[1:]:
                    found.extend(meta.metadata if isinstance(meta, FieldInfo) else [meta])
    return found


def _field_by_alias(model: type[BaseModel], alias: str) -> FieldInfo | None:
    for name, info in model.model_fields.items():
        if alias in (name, info.alias):
            return info
    return None


def resolve_field(
    root: type[BaseModel], loc: tuple[str | int, ...]
) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """Walk a model class along an error location; return (parent model, field info)."""
    current: Any = root
    parent: type[BaseModel] | None = None
    info: FieldInfo | None = None
    for part in loc:
        current = _strip_optional(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else Any
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            parent, info = current, _field_by_alias(current, part)
            if info is None:
                return parent, None
            current = info.annotation
        else:
            return parent, None
    return parent, info


def _bounds(info: FieldInfo) -> tuple[object, object, bool, bool]:
    low: object = None
    high: object = None
    low_open = high_open = False
    for meta in _constraints(info):
        if isinstance(meta, annotated_types.Ge):
            low = meta.ge
        elif isinstance(meta, annotated_types.Gt):
            low, low_open = meta.gt, True
        elif isinstance(meta, annotated_types.Le):
            high = meta.le
        elif isinstance(meta, annotated_types.Lt):
            high, high_open = meta.lt, True
    return low, high, low_open, high_open


def describe_allowed(info: FieldInfo | None) -> str:
    """A short phrase for what a field accepts, from its type and constraints."""
    if info is None:
        return ""
    annotation = _strip_optional(info.annotation)
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    if annotation is bool:
        return "true or false"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "an object with fields " + ", ".join(
            f.alias or n for n, f in annotation.model_fields.items()
        )
    if origin is list:
        return "a list"
    if annotation in (int, float):
        kind = "an integer" if annotation is int else "a number"
        low, high, low_open, high_open = _bounds(info)
        if low is not None and high is not None and not low_open and not high_open:
            return f"{kind} {low}..{high}"
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high}")
        return f"{kind} " + " and ".join(parts) if parts else kind
    if annotation is str:
        for meta in _constraints(info):
            pattern = getattr(meta, "pattern", None)
            if pattern:
                return f"a string matching {pattern}"
        return "a string"
    return ""


def _known_fields(model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    return "known fields: " + ", ".join(f.alias or n for n, f in model.model_fields.items())


_TYPE_ERRORS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    return _KINDS.get(type(value), f"a {type(value).__name__}")


def _one(
    root: type[BaseModel], prefix: tuple[str | int, ...], err: ErrorDetails
) -> list[FieldError]:
    loc = tuple(err["loc"])
    path = join_path(prefix + loc)
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    if kind == RULES_ERROR_TYPE:
        # A violation's field is our own dotted path below the model, not user input.
        where = join_path((*prefix, *loc))
        return [
            FieldError(f"{where}.{field}" if where and field else where or field, problem, allowed)
            for field, problem, allowed in ctx["violations"]
        ]
    if kind == VALUE_ERROR_TYPE:
        return [FieldError(path, str(ctx["problem"]), str(ctx.get("allowed", "")))]
    if kind == "extra_forbidden":
        parent, _ = resolve_field(root, (*loc[:-1], "__none__"))
        return [FieldError(path, "unknown field", _known_fields(parent))]
    _, info = resolve_field(root, loc)
    allowed = describe_allowed(info)
    if kind == "missing":
        return [FieldError(path, "required field is missing", allowed)]
    if kind == "value_error":
        message = err["msg"].removeprefix("Value error, ")
        return [FieldError(path, message, allowed)]
    if kind in _TYPE_ERRORS:
        # Strict fields: say what the value was, since "4" looks like a number in YAML.
        return [
            FieldError(
                path, f"{echo(value)} is {_kind_of(value)}, not {_TYPE_ERRORS[kind]}", allowed
            )
        ]
    if kind in ("enum", "literal_error"):
        return [FieldError(path, f"{echo(value)} is not a valid choice", allowed)]
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return [FieldError(path, f"{echo(value)} is out of range", allowed)]
    if kind in ("string_too_short", "too_short") and value in ("", [], None):
        return [FieldError(path, "must not be empty", allowed)]
    if kind == "string_pattern_mismatch":
        return [FieldError(path, f"{echo(value)} has the wrong format", allowed)]
    return [FieldError(path, f"{echo(value)}: {err['msg'][0].lower()}{err['msg'][1:]}", allowed)]


def field_errors(
    root: type[BaseModel], exc: ValidationError, prefix: tuple[str | int, ...] = ()
) -> list[FieldError]:
    """Every error of ``exc`` (raised validating ``root``), as user-facing lines."""
    out: list[FieldError] = []
    for err in exc.errors(include_url=False):
        out.extend(_one(root, prefix, err))
    return out
