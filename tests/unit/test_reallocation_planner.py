"""Reallocation planner: drain model, predictor, and plans on synthetic loads with known optima."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest

from rlhfspec_workers.messages import MigrationOrder
from rlhfspec_workers.reallocation import (
    LengthPredictor,
    Migration,
    MigrationCost,
    PlannerConfig,
    RunningSample,
    ThroughputModel,
    WorkerLoad,
    drain_seconds,
    plan_migrations,
    predicted_makespan,
    speculative_speed,
    threshold_plan,
    to_orders,
)
from rlhfspec_workers.spec_decode import Roofline, drafter_from_roofline, synthetic_cost_model

# Compute-bound worker: a step costs 1 ms per running sequence and emits one token each, so
# n samples of L tokens take n * L ms on one worker: the optimum is an even split.
LINEAR = ThroughputModel(tuple(0.001 * b for b in range(1, 65)), (1.0,) * 64, 0.0)
# Memory-bound worker: a step costs 10 ms whatever the batch, so splitting gains nothing.
FLAT = ThroughputModel((0.010,) * 64, (1.0,) * 64, 0.0)
FREE = MigrationCost(order_seconds=0.0, per_sample_seconds=0.0, prefill_seconds_per_token=0.0)
EAGER = PlannerConfig(min_gain_fraction=0.0, cost_weight=1.0, overhead_budget=None)


def samples(
    prefix: str, n: int, remaining: float, generated: int = 100
) -> tuple[RunningSample, ...]:
    return tuple(
        RunningSample(f"{prefix}{i}", generated, predicted_remaining=remaining, prompt_tokens=20)
        for i in range(n)
    )


def apply(loads: list[WorkerLoad], plan: Sequence[Migration]) -> list[WorkerLoad]:
    """The loads after a plan: moved samples run at their destination."""
    where = {m.sample_id: m.destination for m in plan}
    by_id = {s.sample_id: s for w in loads for s in w.samples}
    out = []
    for w in loads:
        kept = [s for s in w.samples if where.get(s.sample_id, w.name) == w.name]
        kept += [by_id[sid] for sid, d in where.items() if d == w.name]
        out.append(WorkerLoad(w.name, tuple(kept), max(w.capacity - len(kept), 0)))
    return out


# -- the drain model -----------------------------------------------------------------------------


def test_drain_closed_form() -> None:
    # Both run for 100 tokens at B=2 (2 ms per token), then one for 100 more at B=1.
    assert drain_seconds([100, 200], LINEAR) == pytest.approx(100 * 0.002 + 100 * 0.001)
    assert drain_seconds([], LINEAR) == 0.0
    # Past capacity the samples share the slots: 4 samples on 2 slots take twice as long.
    assert drain_seconds([100] * 4, FLAT, capacity=2) == pytest.approx(2 * 100 * 0.010)


def test_throughput_from_cost_model_uses_the_selectors_k() -> None:
    rf = Roofline(0.006, 0.00006, 0.001)
    cost = synthetic_cost_model(
        rf, drafters=[drafter_from_roofline("d", Roofline(0.0008, 4e-6, 2e-4), [1, 16, 256])]
    )
    speed = speculative_speed(cost, max_batch=256, drafter="d", acceptance=0.8, max_k=8)
    k_small, k_large = speed.strategies[0][1], speed.strategies[255][1]
    assert k_small > k_large  # big k at B=1, little or none at B=256 (compute-bound)
    assert speed.tokens(1) > 2.0
    assert speed.seconds_per_token(256) > speed.seconds_per_token(1)
    plain = ThroughputModel.plain(cost, max_batch=8)
    assert plain.tokens(1) == 1.0
    assert speed.seconds_per_token(1) < plain.seconds_per_token(1)
    assert speed.prefill_seconds_per_token == pytest.approx(cost.verify_seconds(32, 15) / 512)


def test_throughput_from_measured_table_interpolates() -> None:
    speed = ThroughputModel.from_table(
        [(1, 0.010, 3.0), (5, 0.018, 2.0)], prefill_seconds_per_token=1e-4, max_batch=8
    )
    assert speed.step(3) == pytest.approx(0.014)
    assert speed.tokens(3) == pytest.approx(2.5)
    assert speed.step(8) == pytest.approx(0.018 + 3 * 0.002)  # last slope continues
    assert speed.step(20) > speed.step(8)


# -- the length predictor ----------------------------------------------------------------------


def test_predictor_conditional_expectation_with_prior_shrinkage() -> None:
    pred = LengthPredictor([100] * 50 + [1000] * 50, prior_weight=4.0)
    # Past 500 tokens only the 1000-token samples remain: E[L - 500 | L > 500] = 500, shrunk a
    # little toward the memoryless prior (the mean length, 550).
    assert pred.predict_remaining(500) == pytest.approx((50 * 500 + 4 * 550) / 54)
    # Heavy tail: having generated more means more is left, not less.
    assert pred.predict_remaining(500) > pred.predict_remaining(50)
    assert pred.predict_remaining(500, max_tokens=600) == 100.0
    assert pred.predict_remaining(600, max_tokens=600) == 0.0
    assert LengthPredictor(prior_mean=300).predict_remaining(0) == 300.0


def test_predictor_uses_finished_siblings() -> None:
    pred = LengthPredictor([200] * 100)
    base = pred.predict_remaining(100, group_id="g")
    for _ in range(4):
        pred.observe(2000, "g")  # this prompt's siblings ran long
    assert pred.predict_remaining(100, group_id="g") > 5 * base
    assert pred.predict_remaining(100, group_id="other") < 2 * base


def test_predictor_quantiles_have_the_mean_and_a_tail() -> None:
    pred = LengthPredictor(range(1, 2001))
    qs = pred.remaining_quantiles(0)
    mean = sum(q * w for q, w in zip(qs, pred.weights, strict=True))
    assert mean == pytest.approx(pred.predict_remaining(0), rel=0.02)
    assert list(qs) == sorted(qs) and qs[-1] > 1900  # the top band reaches the tail
    cold = LengthPredictor(prior_mean=100).remaining_quantiles(0)
    assert cold[-1] > 4 * cold[0]  # the prior's exponential shape, not a point


# -- plans with known optima ----------------------------------------------------------------------


def test_long_tail_worker_and_idle_worker_are_split_evenly() -> None:
    loads = [WorkerLoad("a", samples("a", 8, 1000), 0), WorkerLoad("b", (), 8)]
    assert predicted_makespan(loads, LINEAR) == pytest.approx(8.0)
    plan = plan_migrations(loads, LINEAR, FREE, config=EAGER)
    assert Counter((m.source, m.destination) for m in plan) == {("a", "b"): 4}
    assert predicted_makespan(apply(loads, plan), LINEAR) == pytest.approx(4.0)
    assert all(m.predicted_gain_seconds > 0 for m in plan)


def test_three_workers_reach_the_even_split() -> None:
    # A greedy of first-best moves would send 4 to b and get stuck at 3/4/2; re-targeting
    # planned moves within a call reaches 3/3/3.
    loads = [WorkerLoad("a", samples("a", 9, 1000), 0), WorkerLoad("b", (), 9)]
    loads.append(WorkerLoad("c", (), 9))
    plan = plan_migrations(loads, LINEAR, FREE, config=EAGER)
    assert predicted_makespan(apply(loads, plan), LINEAR) == pytest.approx(3.0)
    assert len(plan) == 6 and len({m.sample_id for m in plan}) == 6
    assert all(m.source == "a" for m in plan)


def test_scattering_a_tail_over_many_idle_workers_is_one_move() -> None:
    # 16 long samples, 15 idle peers: no single-destination move clears a 10% gain floor
    # after its cost, but spreading the tail over all of them does.
    loads = [WorkerLoad("w0", samples("s", 16, 1000), 0)]
    loads += [WorkerLoad(f"w{i}", (), 16) for i in range(1, 16)]
    cfg = PlannerConfig(min_gain_fraction=0.1, cost_weight=1.0, overhead_budget=None)
    plan = plan_migrations(loads, LINEAR, MigrationCost(prefill_seconds_per_token=1e-4), config=cfg)
    after = predicted_makespan(apply(loads, plan), LINEAR)
    assert after < 0.25 * predicted_makespan(loads, LINEAR)
    assert len({m.destination for m in plan}) >= 7


def test_balanced_load_means_no_migrations() -> None:
    loads = [WorkerLoad(n, samples(n, 6, 500), 2) for n in ("a", "b", "c")]
    assert plan_migrations(loads, LINEAR, FREE, config=EAGER) == []
    # Same with the predictor's distributions instead of point predictions.
    pred = LengthPredictor([50, 100, 200, 400, 800, 1600] * 10)
    loads = [
        WorkerLoad(n, tuple(RunningSample(f"{n}{i}", 30) for i in range(6)), 2)
        for n in ("a", "b", "c")
    ]
    assert plan_migrations(loads, LINEAR, FREE, predictor=pred, config=EAGER) == []


def test_no_migration_when_the_gain_is_below_the_cost() -> None:
    loads = [WorkerLoad("a", samples("a", 8, 1000, generated=1000), 0), WorkerLoad("b", (), 8)]
    # Re-prefilling 1020 tokens at 10 ms each costs ~10 s a sample: more than the 4 s gain.
    dear = MigrationCost(prefill_seconds_per_token=0.01)
    assert plan_migrations(loads, LINEAR, dear, config=EAGER) == []
    # A memory-bound worker is as fast with 8 samples as with 4: nothing to gain at any cost.
    assert plan_migrations(loads, FLAT, FREE, config=EAGER) == []
    # The overhead budget binds too: 1% of 2 workers x 8 s is 0.16 s of engine time, enough
    # for one 0.104 s re-prefill of the four the unconstrained split needs; 0.1% allows none.
    cheap = MigrationCost(prefill_seconds_per_token=1e-4)
    assert len(plan_migrations(loads, LINEAR, cheap, config=EAGER)) == 4
    tight = PlannerConfig(min_gain_fraction=0.0, cost_weight=1.0, overhead_budget=0.01)
    plan = plan_migrations(loads, LINEAR, cheap, config=tight)
    assert len(plan) == 1 and plan[0].destination_busy_seconds <= 0.16
    tighter = PlannerConfig(min_gain_fraction=0.0, cost_weight=1.0, overhead_budget=0.001)
    assert plan_migrations(loads, LINEAR, cheap, config=tighter) == []
    spent = plan_migrations(loads, LINEAR, cheap, config=tight, spent_seconds=0.1)
    assert spent == []  # what earlier calls burnt counts against the same budget
    # A stage that has already run 10 s is longer: its 1% budget pays for more.
    later = plan_migrations(loads, LINEAR, cheap, config=tight, elapsed_seconds=10.0)
    assert len(later) > 1


def test_the_cheaper_mode_is_chosen() -> None:
    loads = [WorkerLoad("a", samples("a", 8, 1000, generated=2000), 0), WorkerLoad("b", (), 8)]
    prefill = 1e-4  # 2020 context tokens: 0.2 s each by recompute
    fast_link = MigrationCost(
        prefill_seconds_per_token=prefill,
        kv_bytes_per_token=1e5,
        kv_bandwidth_bytes_per_second=1e10,
    )  # 0.02 s each by KV copy
    slow_link = MigrationCost(
        prefill_seconds_per_token=prefill, kv_bytes_per_token=1e5, kv_bandwidth_bytes_per_second=1e8
    )  # 2 s each by KV copy
    assert {m.mode for m in plan_migrations(loads, LINEAR, fast_link, config=EAGER)} == {
        "kv_transfer"
    }
    assert {m.mode for m in plan_migrations(loads, LINEAR, slow_link, config=EAGER)} == {
        "recompute"
    }
    assert fast_link.choose(2020, LINEAR)[0] == "kv_transfer"
    forced = MigrationCost(
        prefill_seconds_per_token=prefill,
        kv_bytes_per_token=1e5,
        kv_bandwidth_bytes_per_second=1e10,
        mode="recompute",
    )
    assert forced.choose(2020, LINEAR)[0] == "recompute"
    # No KV path configured: recompute even when asked for kv_transfer.
    assert MigrationCost(mode="kv_transfer").choose(10, LINEAR)[0] == "recompute"
    # A KV copy does not stop the destination's engine; a recompute's prefill does.
    mode, _ = fast_link.choose(2020, LINEAR)
    assert fast_link.engine_seconds(mode, 2020, LINEAR) < fast_link.engine_seconds(
        "recompute", 2020, LINEAR
    )


def test_recently_migrated_samples_stay_put() -> None:
    recent = tuple(
        RunningSample(f"a{i}", 100, predicted_remaining=1000, last_migrated_at=95.0)
        for i in range(8)
    )
    loads = [WorkerLoad("a", recent, 0), WorkerLoad("b", (), 8)]
    cfg = PlannerConfig(min_gain_fraction=0.0, cooldown_seconds=30.0, overhead_budget=None)
    assert plan_migrations(loads, LINEAR, FREE, now=100.0, config=cfg) == []
    assert len(plan_migrations(loads, LINEAR, FREE, now=200.0, config=cfg)) == 4


def test_destinations_never_exceed_their_free_slots() -> None:
    loads = [WorkerLoad("a", samples("a", 16, 1000), 0), WorkerLoad("b", (), 2)]
    plan = plan_migrations(loads, LINEAR, FREE, config=EAGER)
    assert len(plan) == 2


def test_threshold_plan_packs_the_stragglers_onto_the_fewest_workers() -> None:
    loads = [
        WorkerLoad("busy", samples("x", 20, 100), 2),
        WorkerLoad("a", samples("a", 2, 100), 6),
        WorkerLoad("b", samples("b", 1, 100), 7),
        WorkerLoad("c", samples("c", 3, 100), 5),
    ]
    plan = threshold_plan(loads, LINEAR, FREE, threshold=4)
    # b (1 sample) and a (2) fill busy's 2 free slots, the last goes to the fullest tail
    # worker left (c); c itself then has nowhere to go and keeps running.
    assert Counter((m.source, m.destination) for m in plan) == {
        ("b", "busy"): 1,
        ("a", "busy"): 1,
        ("a", "c"): 1,
    }
    assert threshold_plan(loads, LINEAR, FREE, threshold=2) == [m for m in plan if m.source == "b"]
    full = [WorkerLoad("busy", samples("x", 20, 100), 0), WorkerLoad("a", samples("a", 2, 100), 6)]
    assert threshold_plan(full, LINEAR, FREE, threshold=4) == []  # nobody can take them


def test_orders_group_moves_per_source_destination_and_mode() -> None:
    loads = [WorkerLoad("a", samples("a", 9, 1000), 0), WorkerLoad("b", (), 9)]
    loads.append(WorkerLoad("c", (), 9))
    plan = plan_migrations(loads, LINEAR, FREE, config=EAGER)
    orders = to_orders(plan, order_prefix="it3")
    assert all(isinstance(o, MigrationOrder) for o in orders)
    assert sorted(o.destination for o in orders) == ["b", "c"]
    assert sum(len(o.sample_ids) for o in orders) == len(plan)
    assert math.isclose(
        sum(o.predicted_gain_seconds for o in orders), sum(m.predicted_gain_seconds for m in plan)
    )
    assert MigrationOrder.from_bytes(orders[0].to_bytes()) == orders[0]


def test_bad_loads_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        plan_migrations([WorkerLoad("a", (), 1), WorkerLoad("a", (), 1)], LINEAR, FREE)
    twice = samples("s", 1, 10) * 2
    with pytest.raises(ValueError, match="twice"):
        plan_migrations([WorkerLoad("a", twice, 1), WorkerLoad("b", (), 1)], LINEAR, FREE)
    with pytest.raises(KeyError, match="no throughput model"):
        plan_migrations([WorkerLoad("a", (), 1), WorkerLoad("b", (), 1)], {"a": LINEAR}, FREE)
