"""Synthetic cost models sampled from a roofline formula, for tests and the simulator.

Place in the flow: where no engine is timed (unit tests, the reallocation simulator, a worker
with calibration switched off) a `Roofline` stands in for the measured step costs:
`synthetic_cost_model` samples it into an ordinary `cost_model.CostModel` and
`drafter_from_roofline` gives a draft model's per-token costs. Pure standard library.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .cost_model import CostModel
from .cost_records import CostSample, CostTableKey, DrafterCost


@dataclass(frozen=True)
class Roofline:
    """t(B, T) = max(memory_floor, B * T * per_token) + overhead.

    memory_floor: time to stream the weights once (the step cost while memory-bound);
    per_token: compute time per verified token once compute-bound; overhead: fixed launch /
    scheduling cost per step.
    """

    memory_floor_seconds: float = 0.010
    per_token_seconds: float = 0.0002
    overhead_seconds: float = 0.001

    def __call__(self, batch: int, tokens_per_seq: int) -> float:
        compute = batch * tokens_per_seq * self.per_token_seconds
        return max(self.memory_floor_seconds, compute) + self.overhead_seconds


def _half_octaves(max_batch: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... : dense enough that interpolating a roofline between
    points stays within ~10% of the formula at its knee and exact elsewhere."""
    out: set[int] = {max_batch}
    b = 1
    while b <= max_batch:
        out.add(b)
        if b >= 2 and b * 3 // 2 <= max_batch:
            out.add(b * 3 // 2)
        b *= 2
    return sorted(out)


def synthetic_cost_model(
    roofline: Roofline | None = None,
    *,
    drafters: Iterable[DrafterCost] = (),
    max_batch: int = 256,
    max_k: int = 16,
    key: CostTableKey | None = None,
) -> CostModel:
    """A `CostModel` sampled from a roofline formula on a dense grid (every T up to max_k + 1,
    half-octave B up to max_batch), so it agrees with the formula at those points exactly and
    in between to within ~10% (only near the knee). For tests and the simulator."""
    rf = roofline or Roofline()
    samples = [
        CostSample(b, t, rf(b, t)) for b in _half_octaves(max_batch) for t in range(1, max_k + 2)
    ]
    return CostModel(key or CostTableKey("synthetic", "roofline"), samples, drafters)


def drafter_from_roofline(
    name: str, roofline: Roofline, batches: Iterable[int], *, overhead_seconds: float = 0.0
) -> DrafterCost:
    """A draft-model drafter whose one-token forward at batch B costs roofline(B, 1)."""
    return DrafterCost(name, overhead_seconds, tuple((b, roofline(b, 1)) for b in batches))
