"""Built-in model URIs: the one table that maps ``tiny://`` and ``zoo://`` onto local dirs.

Where it sits: between the manifest (``rlhfspec_api.models.MODEL_URI_SCHEMES`` accepts the
schemes) and preflight (``preflight.resolve_location``), which resolves every model and dataset
location before anything starts. A built-in scheme names something this machine can produce
itself: ``tiny://NAME[/SUB]`` a part of the tiny-model kit (built on first use),
``zoo://NAME`` a pretrained model of the zoo (fetched and converted on first use). Other
schemes (``pvc://``, ``file://``, remote ones) are preflight's business, not this table's.

Adding a scheme is one row in :data:`BUILTIN_SCHEMES`; adding a zoo model is one row in
``zoo.entries.ZOO_ENTRIES``. Nothing heavy is imported here: each resolver imports its package
when called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

Resolver = Callable[[str], Path]
"""Full URI (``zoo://smollm2-135m-instruct``) -> local directory or file."""


class ModelURIError(ValueError):
    """A built-in URI that cannot be resolved; ``problem`` and ``allowed`` feed a FieldError."""

    def __init__(self, problem: str, allowed: str = "") -> None:
        super().__init__(f"{problem} ({allowed})" if allowed else problem)
        self.problem = problem
        self.allowed = allowed


def split_uri(uri: str) -> tuple[str, str]:
    """``scheme://rest`` -> ``(scheme, rest)``; a plain path -> ``("", path)``."""
    scheme, sep, rest = uri.partition("://")
    return (scheme, rest) if sep else ("", uri)


def _resolve_tiny(uri: str) -> Path:
    from rlhfspec_workers.tinymodels.build import resolve_model_uri

    return Path(resolve_model_uri(uri))


def _resolve_zoo(uri: str) -> Path:
    from rlhfspec_workers.zoo import ensure_zoo_model, zoo_entry

    name = split_uri(uri)[1].strip("/")
    if "/" in name:
        raise ModelURIError(f"{uri!r}: a zoo model takes no sub-path", "zoo://NAME")
    return ensure_zoo_model(zoo_entry(name).name)


BUILTIN_SCHEMES: Mapping[str, Resolver] = {
    "tiny": _resolve_tiny,
    "zoo": _resolve_zoo,
}


def resolve_builtin(uri: str, overrides: Mapping[str, Resolver] | None = None) -> Path | None:
    """The local path of a built-in URI (built or fetched on first use); None for any other
    location. ``overrides`` replaces rows of the table (tests pass a fake ``tiny`` resolver).
    Raises :class:`ModelURIError` (or ValueError) when the URI names nothing."""
    scheme, _ = split_uri(uri)
    resolver = (overrides or {}).get(scheme) or BUILTIN_SCHEMES.get(scheme)
    return None if resolver is None else resolver(uri)


__all__ = ["BUILTIN_SCHEMES", "ModelURIError", "Resolver", "resolve_builtin", "split_uri"]
