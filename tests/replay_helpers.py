"""Shared by the replay tests (``test_hindsight``, ``test_expectation_oracle``): a step-cost
function with the shape of a real verification cost."""

from __future__ import annotations

from rlhfspec_workers.spec_decode.hindsight import OFF


def linear_cost(drafter: str, batch: int, k: int) -> float:
    """A verification step costs more with more tokens in it (batch x (1 + k))."""
    return 0.01 + 0.001 * batch * (1 + (k if drafter != OFF else 0))
