"""A generation worker's step profile and prefill rate, the planner's picture of its speed:
only decoding steps make the profile, each timed with the worker's own work since the step
before; steps that also prefilled prompts price a prompt token instead."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest

from rlhfspec_workers.generation.handover import (
    Handover,
    prefill_seconds_per_token,
    step_profile,
)
from rlhfspec_workers.generation.records import StepRecord


def step(batch: int, seconds: float, *, gap: float = 0.0, prefill: int = 0) -> StepRecord:
    return StepRecord(
        step=0, batch_size=batch, num_finished=0, drafter="off", k=0, num_drafts=0,
        num_draft_tokens=0, num_accepted_tokens=0, accepted_per_pos=(), drafted_per_pos=(),
        proposer_draft_tokens=-1, proposer_accepted_tokens=-1, next_drafter="off", next_k=0,
        next_draft_tokens=0, step_seconds=seconds, draft_seconds=0.0, prefill_tokens=prefill,
        gap_seconds=gap,
    )  # fmt: skip


def test_prefilling_steps_stay_out_of_the_decode_profile() -> None:
    # What a batch of 144 prompts did to the 2-worker benchmark: one step at 137 rows took
    # 0.86 s against ~0.07 s for decoding alone, and the planner priced 137 rows at it.
    holder = SimpleNamespace(recent_steps=deque(), recent_prefills=deque())
    for record in (step(137, 0.86, prefill=2000), step(137, 0.07), step(137, 0.08)):
        Handover.observe_step(holder, record)  # type: ignore[arg-type]
    assert [s.prefill_tokens for s in holder.recent_prefills] == [2000]
    rows = step_profile(holder.recent_steps)
    assert rows == [[137.0, 0.08, 1.0]]  # the upper median of the two decode steps


def test_a_step_costs_the_engine_time_plus_the_worker_s_gap() -> None:
    rows = step_profile([step(8, 0.010, gap=0.002), step(8, 0.012, gap=0.001), step(0, 1.0)])
    assert rows == [[8.0, pytest.approx(0.013), 1.0]]  # batch 0 (idle) is no step


def test_prefill_rate_is_the_excess_over_decoding_at_the_nearest_batch() -> None:
    profile = [[16.0, 0.02, 1.0], [128.0, 0.07, 1.0]]
    prefills = [step(120, 0.57, prefill=1000), step(20, 0.22, gap=0.0, prefill=400)]
    # (0.57 - 0.07) / 1000 and (0.22 - 0.02) / 400: 0.5 ms a token either way.
    assert prefill_seconds_per_token(prefills, profile) == pytest.approx(5e-4)
    assert prefill_seconds_per_token([], profile) is None
    # Without a profile the whole step is charged to its prompts.
    assert prefill_seconds_per_token([step(4, 0.1, prefill=100)], []) == pytest.approx(1e-3)
