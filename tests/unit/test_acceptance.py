"""Acceptance estimator: prior, convergence, adaptation, counters, merge, collapse, JSON."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Sequence

import pytest

from rlhfspec_workers.spec_decode.acceptance import (
    VLLM_NUM_ACCEPTED_PER_POS,
    VLLM_NUM_ACCEPTED_TOKENS,
    VLLM_NUM_DRAFT_TOKENS,
    VLLM_NUM_DRAFTS,
    AcceptanceEstimator,
    BetaPrior,
    FixedAcceptance,
    SpecDecodeCounters,
    StepStats,
    counters_delta,
    pool,
)


def simulate_step(
    rng: random.Random, rates: Sequence[float], batch: int, k: int, vector_len: int = 8
) -> StepStats:
    """One engine step: `batch` drafts of k tokens, prefix acceptance with conditional rates.
    The per-position vector is as long as the engine's max k (vLLM pads with zeros)."""
    per_pos = [0] * vector_len
    accepted = 0
    for _ in range(batch):
        n = 0
        while n < k and rng.random() < rates[min(n, len(rates) - 1)]:
            n += 1
        for i in range(n):
            per_pos[i] += 1
        accepted += n
    return StepStats(batch, batch * k, accepted, tuple(per_pos))


def true_expected(rates: Sequence[float], k: int) -> float:
    # Brute force over the outcome "exactly j accepted" (independent of the implementation's
    # sum-of-products form).
    total = 0.0
    for j in range(1, k + 1):
        p_reach_j = math.prod(rates[min(i, len(rates) - 1)] for i in range(j))
        p_stop = 1.0 - rates[min(j, len(rates) - 1)] if j < k else 1.0
        total += j * p_reach_j * p_stop
    return total


def test_unseen_drafter_uses_prior_and_deeper_positions_are_conservative() -> None:
    est = AcceptanceEstimator("eagle", prior=BetaPrior(mean=0.6, strength=4, position_decay=0.9))
    rates = est.rates(6)
    assert rates[0] == pytest.approx(0.6)
    assert all(b < a for a, b in itertools.pairwise(rates))
    values = [est.expected_accepted(k) for k in range(0, 9)]
    assert values[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(values))
    assert values[8] < FixedAcceptance((0.6,)).expected_accepted(8)  # below flat extrapolation
    assert math.isnan(est.mean_accepted_length) and not est.collapsed


def test_fixed_acceptance_matches_brute_force() -> None:
    for rates in ((0.8,), (0.9, 0.7, 0.5), (1.0,), (0.0,)):
        fa = FixedAcceptance(rates)
        for k in range(0, 9):
            assert fa.expected_accepted(k) == pytest.approx(true_expected(rates, k))
    with pytest.raises(ValueError):
        FixedAcceptance((1.2,))


@pytest.mark.parametrize("half_life", [math.inf, 2000.0])
def test_converges_to_true_rates_from_bernoulli_stream(half_life: float) -> None:
    truth = (0.9, 0.8, 0.7, 0.6)
    rng = random.Random(1234)
    est = AcceptanceEstimator("draft", half_life_drafts=half_life)
    for _ in range(400):
        est.update(simulate_step(rng, truth, batch=16, k=4))
    for got, want in zip(est.rates(4), truth, strict=True):
        assert got == pytest.approx(want, abs=0.04)
    for k in (1, 2, 4):
        assert est.expected_accepted(k) == pytest.approx(true_expected(truth, k), rel=0.05)
    assert est.mean_accepted_length == pytest.approx(1 + true_expected(truth, 4), rel=0.05)


def test_positions_beyond_those_observed_extrapolate_downward() -> None:
    rng = random.Random(5)
    est = AcceptanceEstimator("draft", half_life_drafts=math.inf)
    for _ in range(200):
        est.update(simulate_step(rng, (0.8,), batch=8, k=2, vector_len=8))
    r = est.rates(8)
    assert r[0] == pytest.approx(0.8, abs=0.05) and r[1] == pytest.approx(0.8, abs=0.05)
    # The zero-padded per-position vector (k=2 < vector length 8) is not read as rejections...
    assert r[2] > 0.5
    # ...but unobserved positions are not assumed as good as the observed ones either.
    assert r[2] < r[1] and all(b < a for a, b in itertools.pairwise(r))


def test_adapts_after_acceptance_drop_within_bounded_steps() -> None:
    half_life, batch = 500.0, 16
    rng = random.Random(99)
    est = AcceptanceEstimator("draft", half_life_drafts=half_life)
    for _ in range(300):
        est.update(simulate_step(rng, (0.85,), batch, k=4))
    assert est.rate(0) == pytest.approx(0.85, abs=0.05)
    # Weight sync: the policy moved, the drafter is stale.
    est.update(simulate_step(rng, (0.3,), batch, k=4))
    assert est.rate(0) > 0.6  # one step does not swing the estimate (noise resistance)
    # Old evidence weighs <= 5% after log2(20) half-lives of drafts: a bound on the steps.
    bound = math.ceil(half_life * math.log2(20) / batch)
    for _ in range(bound):
        est.update(simulate_step(rng, (0.3,), batch, k=4))
    assert est.rate(0) == pytest.approx(0.3, abs=0.07)
    # Deeper positions are reached less often after the drop (0.3 of drafts reach position 1),
    # so they gather new evidence more slowly; twice the bound covers them too.
    for _ in range(bound):
        est.update(simulate_step(rng, (0.3,), batch, k=4))
    assert est.expected_accepted(4) == pytest.approx(true_expected((0.3,), 4), abs=0.1)


def test_forget_hook_makes_adaptation_fast() -> None:
    rng = random.Random(3)
    slow = AcceptanceEstimator("d", half_life_drafts=5000.0)
    for _ in range(300):
        slow.update(simulate_step(rng, (0.9,), 16, k=4))
    fast = slow.copy()
    fast.forget(0.01)
    for _ in range(40):
        stats = simulate_step(rng, (0.2,), 16, k=4)
        slow.update(stats)
        fast.update(stats)
    assert abs(fast.rate(0) - 0.2) < 0.1 and abs(slow.rate(0) - 0.2) > 0.4
    with pytest.raises(ValueError):
        fast.forget(1.5)


def test_counters_delta_from_cumulative_snapshots() -> None:
    rng = random.Random(11)
    steps = [simulate_step(rng, (0.7,), 4, k=3, vector_len=3) for _ in range(5)]
    snapshots, cum = [], SpecDecodeCounters()
    for s in steps:
        cum = SpecDecodeCounters(
            cum.num_drafts + s.num_drafts,
            cum.num_draft_tokens + s.num_draft_tokens,
            cum.num_accepted_tokens + s.num_accepted_tokens,
            tuple(
                a + b
                for a, b in zip(cum.accepted_per_pos or (0, 0, 0), s.accepted_per_pos, strict=True)
            ),
        )
        snapshots.append(cum)
    deltas = [counters_delta(None, snapshots[0])]
    deltas += [counters_delta(a, b) for a, b in itertools.pairwise(snapshots)]
    assert [
        (d.num_drafts, d.num_draft_tokens, d.num_accepted_tokens, d.accepted_per_pos)
        for d in deltas
    ] == [
        (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, s.accepted_per_pos) for s in steps
    ]
    # Engine restart: counters start from zero again; the new snapshot is the delta.
    restarted = SpecDecodeCounters(2, 6, 3, (2, 1, 0))
    d = counters_delta(snapshots[-1], restarted)
    assert (d.num_drafts, d.num_accepted_tokens, d.accepted_per_pos) == (2, 3, (2, 1, 0))
    # A longer per-position vector (engine started with a larger max k) is padded, not truncated.
    d2 = counters_delta(
        SpecDecodeCounters(1, 2, 1, (1, 0)), SpecDecodeCounters(3, 8, 4, (3, 1, 0, 0))
    )
    assert d2.accepted_per_pos == (2, 1, 0, 0)


def test_counters_from_vllm_metric_mapping() -> None:
    metrics: dict[str, float | list[float]] = {
        VLLM_NUM_DRAFTS: 10.0,
        VLLM_NUM_DRAFT_TOKENS: 40.0,
        VLLM_NUM_ACCEPTED_TOKENS: 17.0,
        VLLM_NUM_ACCEPTED_PER_POS: [8.0, 5.0, 3.0, 1.0],
    }
    c = SpecDecodeCounters.from_metrics(metrics)
    assert c == SpecDecodeCounters(10, 40, 17, (8, 5, 3, 1))
    assert counters_delta(None, c).mean_accepted_length == pytest.approx(2.7)
    with pytest.raises(TypeError):
        SpecDecodeCounters.from_metrics({VLLM_NUM_ACCEPTED_PER_POS: 3.0})


def _three_histories() -> list[AcceptanceEstimator]:
    rng = random.Random(21)
    out = []
    for i, (rate, k, n) in enumerate([(0.8, 4, 30), (0.5, 2, 50), (0.9, 6, 10)]):
        e = AcceptanceEstimator("draft", half_life_drafts=300.0 + 100 * i)
        for _ in range(n):
            e.update(simulate_step(rng, (rate,), 8, k))
        out.append(e)
    return out


def test_merge_is_associative_and_commutative() -> None:
    a, b, c = _three_histories()
    left = a.merge(b).merge(c)
    right = a.merge(b.merge(c))
    swapped = a.merge(c).merge(b)
    for x in (right, swapped):
        assert x.drafts == pytest.approx(left.drafts)
        assert x.rates(8) == pytest.approx(left.rates(8), rel=1e-12)
        assert x.successes == pytest.approx(left.successes) and x.trials == pytest.approx(
            left.trials
        )
    assert b.merge(a).rates(6) == pytest.approx(a.merge(b).rates(6), rel=1e-12)
    # Merging does not mutate its inputs.
    assert a.drafts < left.drafts
    with pytest.raises(ValueError):
        a.merge(AcceptanceEstimator("ngram"))


def test_pooling_workers_equals_one_estimator_seeing_everything() -> None:
    rng = random.Random(8)
    steps = [simulate_step(rng, (0.75, 0.6), 8, k=3) for _ in range(60)]
    whole = AcceptanceEstimator("draft", half_life_drafts=math.inf)
    workers = [AcceptanceEstimator("draft", half_life_drafts=math.inf) for _ in range(3)]
    for i, s in enumerate(steps):
        whole.update(s)
        workers[i % 3].update(s)
    other = AcceptanceEstimator("ngram")
    pooled = pool([*workers, other])
    assert set(pooled) == {"draft", "ngram"}
    assert pooled["draft"].rates(5) == pytest.approx(whole.rates(5), rel=1e-12)
    assert pooled["draft"].drafts == whole.drafts
    assert workers[0].drafts < whole.drafts  # pool copies, never aliases a worker's estimator


def test_collapse_flag() -> None:
    rng = random.Random(4)
    est = AcceptanceEstimator("stale", half_life_drafts=500.0, collapse_min_drafts=100.0)
    for _ in range(6):  # 96 drafts: not yet enough to call it
        est.update(simulate_step(rng, (0.02,), 16, k=4))
        assert not est.collapsed
    for _ in range(4):
        est.update(simulate_step(rng, (0.02,), 16, k=4))
    assert est.collapsed
    # A healthy drafter is never flagged; a recovered one is un-flagged.
    healthy = AcceptanceEstimator("ok", half_life_drafts=500.0)
    for _ in range(100):
        healthy.update(simulate_step(rng, (0.6,), 16, k=4))
        est.update(simulate_step(rng, (0.6,), 16, k=4))
        assert not healthy.collapsed
    assert not est.collapsed


def test_serialisation_round_trips_through_json() -> None:
    for est in [*_three_histories(), AcceptanceEstimator("fresh", half_life_drafts=math.inf)]:
        text = json.dumps(est.to_dict())
        back = AcceptanceEstimator.from_dict(json.loads(text))
        assert back == est
        assert back.rates(8) == est.rates(8)
        assert back.collapsed == est.collapsed


def test_step_stats_validation_and_empty_updates() -> None:
    with pytest.raises(ValueError):
        StepStats(-1, 0, 0)
    with pytest.raises(ValueError):
        StepStats(1, 1, 0, (-1,))
    assert math.isnan(StepStats(0, 0, 0).mean_accepted_length)
    est = AcceptanceEstimator("d")
    before = est.rates(4)
    est.update(StepStats(0, 0, 0))
    # Aggregate-only stats (no per-position vector) feed the mean length, not the rates.
    est.update(StepStats(10, 40, 5))
    assert est.rates(4) == before and est.mean_accepted_length == pytest.approx(1.5)
    with pytest.raises(ValueError):
        AcceptanceEstimator("d", half_life_drafts=0.0)
