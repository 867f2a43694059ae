"""Every payload that crosses Redis, and every Redis key name: one module, typed and versioned.

Where it sits: between all processes of a job. The coordinator, generation, inference and
trainer workers write and read these; the operator reads :class:`JobProgress` to fill the
RLHFJob status (it may import this module: pure pydantic, no engine code). A message carries
``kind`` and ``version``; :func:`decode` rejects unknown kinds and versions with
:class:`MessageError` instead of guessing, so a rolling upgrade never silently misreads data.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1


class MessageError(ValueError):
    """A payload that is not a valid message of the expected kind and version."""


class Message(BaseModel):
    """Base of all Redis payloads: JSON bytes with a kind and a schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KIND: ClassVar[str] = "message"
    version: int = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        body = self.model_dump(mode="json")
        body["kind"] = self.KIND
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls: type[_M], raw: bytes | str) -> _M:
        return decode(raw, cls)


_M = TypeVar("_M", bound=Message)


def decode(raw: bytes | str, expected: type[_M]) -> _M:
    """Parse ``raw`` as an ``expected`` message; raise MessageError saying what is wrong."""
    try:
        body: Any = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MessageError(f"expected a JSON object, got {type(body).__name__}")
    kind = body.pop("kind", None)
    if kind != expected.KIND:
        raise MessageError(f"kind {kind!r} is not {expected.KIND!r}")
    version = body.get("version")
    if version != SCHEMA_VERSION:
        raise MessageError(
            f"{expected.KIND} version {version!r} unsupported (want {SCHEMA_VERSION})"
        )
    try:
        return expected.model_validate(body)
    except ValidationError as exc:
        raise MessageError(f"invalid {expected.KIND}: {exc.errors(include_url=False)}") from None


class JobProgress(Message):
    """The coordinator's running summary of a job; the operator copies it into the status."""

    KIND: ClassVar[str] = "job_progress"
    iteration: int = Field(ge=0)
    total_iterations: int = Field(ge=0)
    state: Literal["starting", "running", "succeeded", "failed"] = "running"
    message: str = ""
    tokens_per_second: float | None = None
    mean_accepted_length: float | None = None
    strategy: str | None = None
    strategy_table_version: int | None = None
    migrations: int = 0
    reward_mean: float | None = None
    kl: float | None = None
    weight_version: int = 0
    updated_at: float = 0.0
    """Unix time the coordinator wrote this (the operator flags stale progress)."""


class Keys:
    """Redis key and stream names of one job; every name is prefixed by namespace and job."""

    def __init__(self, namespace: str, job: str) -> None:
        self.prefix = f"rlhfspec:{namespace or 'default'}:{job}"

    def _key(self, *parts: str | int) -> str:
        return ":".join([self.prefix, *(str(p) for p in parts)])

    @property
    def progress(self) -> str:
        """JobProgress of the job (string key, overwritten)."""
        return self._key("progress")

    @property
    def metrics_stream(self) -> str:
        """Per-iteration metrics records (stream)."""
        return self._key("metrics")
