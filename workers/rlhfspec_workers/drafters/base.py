"""What every drafter sees and returns: one decode step's batch of requests -> draft tokens.

Where it sits: ``generation.proposer.AdaptiveProposer`` (vLLM's ``custom_class`` proposer)
turns vLLM's per-step arrays into :class:`DraftRow`s and asks the drafter chosen for the step
for up to ``k`` tokens per row. vLLM then verifies exactly what was returned (rejection
sampling against the target, lossless), so a drafter only affects speed, never the sampled
distribution. Drafts are deterministic proposals (probability one on the proposed token);
vLLM accepts a proposed token with the target's probability of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from rlhfspec_api.generation import MODEL_BASED_DRAFTERS, DrafterMethod, DrafterSpec

TokenArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class DraftRow:
    """One request of the batch at the moment of drafting."""

    req_id: str
    """vLLM's internal request id (stable for the request's lifetime)."""
    tokens: TokenArray
    """Prompt + output so far (including the token sampled in this step)."""
    prompt_len: int
    group: str
    """Prompt-group key: samples of the same prompt (siblings) and earlier rollouts of that
    prompt share it; the suffix drafter drafts from them."""
    max_k: int
    """Most draft tokens worth proposing for this row (0 while prefilling or when the row
    will hit max_tokens / max_model_len first)."""


class Drafter(Protocol):
    """A candidate drafter inside the adaptive proposer."""

    name: str

    def propose(self, rows: Sequence[DraftRow], k: int) -> list[list[int]]:
        """Up to ``min(k, row.max_k)`` tokens per row (fewer when nothing is worth proposing)."""
        ...

    def release(self, req_ids: Iterable[str]) -> None:
        """Forget requests that left the batch (finished, aborted or preempted)."""
        ...


def cap_drafts(drafts: list[list[int]], rows: Sequence[DraftRow], k: int) -> list[list[int]]:
    """Enforce the per-row cap (a drafter bug must not make vLLM verify more than chosen)."""
    return [d[: max(0, min(k, row.max_k))] for d, row in zip(drafts, rows, strict=True)]


@runtime_checkable
class KeepsHistory(Protocol):
    """A drafter whose state outlives an RL iteration (the suffix drafters' rollouts): the
    engine calls :meth:`new_iteration` on every such drafter between iterations. Its drafts
    depend on which tokens every sibling has reached, so the benchmark replays it live
    (``generation.shadow.LiveReplay``) and starts each measured run from the same index."""

    name: str

    def new_iteration(self) -> None: ...

    def add_history(self, group: str, sequences: Iterable[Sequence[int]]) -> None:
        """Rollouts of ``group`` from elsewhere join the newest finished iteration."""
        ...

    def clear(self) -> None:
        """Forget every rollout, live and past (a benchmark run starts from an empty index)."""
        ...

    def fresh(self) -> KeepsHistory:
        """An empty drafter with the same settings."""
        ...

    def observe(self, rows: Sequence[DraftRow]) -> None: ...

    def propose(self, rows: Sequence[DraftRow], k: int) -> list[list[int]]: ...

    def release(self, req_ids: Iterable[str]) -> None: ...


@dataclass(frozen=True)
class BuildContext:
    """What a per-step drafter's factory gets."""

    spec: DrafterSpec
    model_path: Path | None
    """The resolved draft model (model-based drafters)."""
    max_slots: int
    max_len: int
    device: str
    field: str
    """The spec field of this drafter, for errors (``generation.speculative.drafters[0]``)."""


@dataclass(frozen=True)
class NativeContext:
    """What a drafter's vLLM-native config (the benchmark baselines) is built from."""

    spec: DrafterSpec
    num_tokens: int
    model_path: Path | None
    per_batch_size: Sequence[tuple[int, int, int]] | None
    """vLLM Dynamic SD's schedule: (lo, hi, k) rows, or None for a fixed k."""


@dataclass(frozen=True)
class DrafterEntry:
    """One drafter method: each drafter module defines its ``ENTRY``; the registry lists them.

    ``build``: the factory of a per-step candidate of the adaptive proposer (None: the method
    cannot be switched per step, e.g. EAGLE needs hidden states vLLM does not hand to custom
    proposers). ``native``: vLLM's own speculative config for the method (None: vLLM has none
    on this install); it returns None for "no speculative config at all" (off).
    ``missing``: what this install lacks to run the method, or None when it has everything
    (a library built at set-up time, say); checked before any engine starts."""

    name: str
    build: Callable[[BuildContext], Drafter] | None
    native: Callable[[NativeContext], dict[str, Any] | None] | None
    gpu_only: bool = False
    missing: Callable[[], str | None] | None = None

    @property
    def per_step(self) -> bool:
        return self.build is not None

    @property
    def needs_model(self) -> bool:
        """Read from the spec contract, which states it once for the validator too."""
        methods = {m.value: m for m in DrafterMethod}
        return self.name in methods and methods[self.name] in MODEL_BASED_DRAFTERS
