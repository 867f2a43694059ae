"""The quantities a cost table is made of: timed steps, drafter costs, and the table's identity.

Place in the flow: calibration (the generation worker's probes) produces `CostSample`s (one
timed engine step at B sequences x T tokens) and `DrafterCost`s per drafter; a
`cost_model.CostModel` is fitted from them and cached under a `CostTableKey` (model +
hardware). `OFF` names "no speculation" wherever a drafter name is expected (cost model,
selector, bandit). Pure standard library.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

OFF = "off"
"""Drafter name meaning "no speculation" (k = 0)."""


@dataclass(frozen=True)
class CostSample:
    """One measured engine step: B sequences, T = k + 1 tokens verified per sequence."""

    batch_size: int
    tokens_per_seq: int
    seconds: float

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.tokens_per_seq < 1:
            raise ValueError(f"batch_size and tokens_per_seq must be >= 1: {self}")
        if not (self.seconds >= 0.0 and math.isfinite(self.seconds)):
            raise ValueError(f"seconds must be finite and >= 0: {self}")


@dataclass(frozen=True)
class DrafterCost:
    """What proposing k tokens costs one drafter: a fixed per-step overhead when drafting at
    all (k > 0), plus k draft forwards whose cost depends on B.

    `per_token` holds measured (batch_size, seconds per draft forward) points; empty means a
    model-free drafter (n-gram, suffix tree) whose per-token cost is negligible.
    """

    name: str
    overhead_seconds: float = 0.0
    per_token: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.name == OFF:
            raise ValueError(f"{OFF!r} is reserved for 'no speculation'")
        if self.overhead_seconds < 0.0 or any(b < 1 or s < 0.0 for b, s in self.per_token):
            raise ValueError(f"negative cost or batch < 1 in {self}")


@dataclass(frozen=True)
class CostTableKey:
    """Identity of a calibration: it is valid for one target model on one hardware type."""

    model_id: str
    hardware_id: str

    def slug(self) -> str:
        """A file-name / Redis-key safe id, stable across runs."""
        raw = f"{self.model_id}@{self.hardware_id}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_")


def bookkeeping_at(measured: Mapping[int, float], batch_size: int) -> float:
    """The proposer's own per-step seconds at B (its drafting call with nothing to draft:
    rows, feedback, index updates), from the batch sizes where calibration measured it:
    linear between them, proportional to B beyond the ends (it is per-row work); 0 unmeasured.
    Inside every verification sample, so a drafter is charged only what it adds to it."""
    if not measured:
        return 0.0
    if batch_size in measured:
        return measured[batch_size]
    xs = sorted(measured)
    lo = max((x for x in xs if x < batch_size), default=xs[0])
    hi = min((x for x in xs if x > batch_size), default=xs[-1])
    if lo == hi:
        return measured[lo] * batch_size / lo
    return measured[lo] + (batch_size - lo) / (hi - lo) * (measured[hi] - measured[lo])
