"""What every drafter sees and returns: one decode step's batch of requests -> draft tokens.

Where it sits: ``generation.proposer.AdaptiveProposer`` (vLLM's ``custom_class`` proposer)
turns vLLM's per-step arrays into :class:`DraftRow`s and asks the drafter chosen for the step
for up to ``k`` tokens per row. vLLM then verifies exactly what was returned (rejection
sampling against the target, lossless), so a drafter only affects speed, never the sampled
distribution. Drafts are deterministic proposals (probability one on the proposed token);
vLLM accepts a proposed token with the target's probability of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

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
