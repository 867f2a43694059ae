"""Our selector's k per batch size kept in vLLM's Dynamic SD lookup
(``generation.native_schedule``): the lookup follows the cost model across batch sizes and
the acceptance vLLM reports step by step; only entries near the batch move."""

from __future__ import annotations

import pytest

from rlhfspec_api.generation import GenerationSpec
from rlhfspec_workers.benchmarks.reallocation_sim import gpu_like_cost_model
from rlhfspec_workers.generation.adaptive import adaptive_strategy_for
from rlhfspec_workers.generation.native_schedule import NativeSchedule, feedback_of
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.spec_decode.acceptance import BetaPrior
from rlhfspec_workers.spec_decode.phased import phase_of

SPEC = GenerationSpec.model_validate({})


def schedule(mean: float = 0.8) -> NativeSchedule:
    """A memory-bound (GPU-like) target: drafting deep pays at small batches, less at 256."""
    cost = gpu_like_cost_model(max_batch=256)
    priors = {"draft": BetaPrior(mean=mean, strength=4.0, position_decay=1.0)}
    strategy = adaptive_strategy_for(["draft"], 8, SPEC, cost, priors=priors)
    return NativeSchedule(strategy, "draft")


def native_step(batch: int, k: int, accepted: tuple[int, ...]) -> StepRecord:
    """What the engine records for a native step: vLLM's counters, nothing of a proposer."""
    return StepRecord(
        step=0, batch_size=batch, num_finished=0, drafter="draft", k=k, num_drafts=batch,
        num_draft_tokens=batch * k, num_accepted_tokens=sum(accepted),
        accepted_per_pos=accepted, drafted_per_pos=(batch,) * k, proposer_draft_tokens=-1,
        proposer_accepted_tokens=-1, next_drafter="off", next_k=0, next_draft_tokens=0,
        step_seconds=0.01, draft_seconds=0.0,
    )  # fmt: skip


def test_fill_gives_each_batch_size_the_selector_s_k() -> None:
    sched = schedule()
    lookup = [0] * 257
    sched.fill(lookup)
    assert lookup[0] == 0  # vLLM's lookup is 1-indexed
    assert all(lookup[b] == sched.k_at(b) for b in range(1, 257))
    assert lookup[1] >= 3 and lookup[256] < lookup[1]  # drafting pays less at a full batch
    assert sched.rewrites == sum(1 for k in lookup[1:] if k != 0)


def test_rejected_drafts_turn_drafting_off_and_only_near_the_batch() -> None:
    """vLLM reports every draft rejected at batch 8: within a few steps drafting stops at 8
    and at the batch sizes of its phase; the other entries in the window drop too (the
    pooled estimate fell; a phase without evidence of its own keeps some optimism), and
    entries far from the batch keep the prior's k until the batch comes near."""
    sched = schedule()
    lookup = [0] * 257
    sched.fill(lookup)
    before = list(lookup)
    for _ in range(12):
        k = lookup[8]
        if k == 0:
            break
        sched.observe(native_step(8, k, (0,) * k), lookup)
    assert lookup[8] == 0
    same_phase = [b for b in range(4, 13) if phase_of(b) == phase_of(8)]
    assert len(same_phase) > 1 and all(lookup[b] == 0 for b in same_phase)
    assert all(lookup[b] == sched.k_at(b) < before[b] for b in range(4, 13))  # the window
    assert lookup[64] == before[64] > 0  # untouched: not near the batch
    sched.observe(native_step(64, 0, ()), lookup)  # a plain step at 64: no evidence, rewrite
    assert lookup[64] == sched.k_at(64)


def test_a_prefill_step_or_an_empty_batch_teaches_nothing() -> None:
    sched = schedule()
    lookup = [0] * 65
    sched.fill(lookup)
    drafts = sched.strategy.estimators["draft"].drafts
    prefill = native_step(8, 4, (0, 0, 0, 0))
    object.__setattr__(prefill, "prefill_tokens", 100)
    sched.observe(prefill, lookup)
    sched.observe(native_step(0, 4, (0, 0, 0, 0)), lookup)
    assert sched.strategy.estimators["draft"].drafts == drafts


def test_feedback_of_a_native_step() -> None:
    step = native_step(5, 3, (4, 2, 1, 9))
    fb = feedback_of(step, "draft")
    assert (fb.choice.drafter, fb.choice.k, fb.batch_size, fb.rows_asked) == ("draft", 3, 5, 5)
    assert fb.accepted_per_pos == (4, 2, 1)  # vLLM's counters beyond k are not this step's


def test_a_drafter_without_an_estimate_is_refused() -> None:
    strategy = adaptive_strategy_for(["draft"], 8, SPEC, gpu_like_cost_model(max_batch=8))
    with pytest.raises(ValueError, match="no estimate of 'ngram'"):
        NativeSchedule(strategy, "ngram")
    with pytest.raises(ValueError, match="window"):
        NativeSchedule(strategy, "draft", window=-1)
