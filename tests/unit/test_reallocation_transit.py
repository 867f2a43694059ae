"""Reports lag orders: planning again on the same stale reports must not move the same
imbalance twice (the overshoot seen on two real workers), and arrivals clear the ledger."""

from __future__ import annotations

from rlhfspec_workers.reallocation import (
    MigrationCost,
    PlannerConfig,
    RunningSample,
    ThroughputModel,
    WorkerLoad,
    plan_migrations,
)
from rlhfspec_workers.reallocation.transit import TransitLedger

LINEAR = ThroughputModel(tuple(0.001 * b for b in range(1, 129)), (1.0,) * 128, 0.0)
FREE = MigrationCost(order_seconds=0.0, per_sample_seconds=0.0, prefill_seconds_per_token=0.0)
EAGER = PlannerConfig(min_gain_fraction=0.0, cost_weight=1.0, overhead_budget=None)


def _skewed() -> list[WorkerLoad]:
    busy = tuple(
        RunningSample(f"a{i}", 10, predicted_remaining=80.0, prompt_tokens=12) for i in range(48)
    )
    return [WorkerLoad("w0", busy, 80), WorkerLoad("w1", (), 128)]


def test_a_second_plan_on_the_same_stale_reports_moves_nothing_more() -> None:
    stale = _skewed()
    ledger = TransitLedger()
    first = plan_migrations(ledger.apply(stale, 0.0), LINEAR, FREE, config=EAGER)
    assert 16 <= len(first) <= 32  # about half of the 48 go
    ledger.record(first, stale, 0.0)
    # Without the ledger the same reports would trigger the same moves again.
    assert len(plan_migrations(stale, LINEAR, FREE, config=EAGER)) == len(first)
    again = plan_migrations(ledger.apply(stale, 0.2), LINEAR, FREE, config=EAGER, now=0.2)
    assert len(again) <= 1


def test_arrived_moves_leave_the_ledger_and_old_ones_expire() -> None:
    stale = _skewed()
    ledger = TransitLedger(timeout_seconds=5.0)
    plan = plan_migrations(stale, LINEAR, FREE, config=EAGER)
    ledger.record(plan, stale, 0.0)
    moved = {m.sample_id for m in plan}
    view = {w.name: {s.sample_id for s in w.samples} for w in ledger.apply(stale, 1.0)}
    assert view["w1"] == moved and not moved & view["w0"]
    # The destination now reports them: nothing left in transit, the reports speak.
    landed = [
        WorkerLoad("w0", tuple(s for s in stale[0].samples if s.sample_id not in moved), 80),
        WorkerLoad("w1", tuple(s for s in stale[0].samples if s.sample_id in moved), 100),
    ]
    assert ledger.apply(landed, 1.5) == landed and not ledger.moves
    ledger.record(plan, stale, 2.0)
    ledger.apply(stale, 7.5)
    assert not ledger.moves  # expired: a lost move no longer distorts the view
