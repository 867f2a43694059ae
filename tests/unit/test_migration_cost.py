"""The coordinator's cost model of a move: KV transfer only where every worker has the path,
priced at the slowest measured hand-over rate; ``auto`` takes whichever is cheaper."""

from __future__ import annotations

import pytest

from rlhfspec_workers.coordinator.reallocate import KV_PRIOR_BYTES_PER_SECOND, migration_cost
from rlhfspec_workers.messages import LoadReport
from rlhfspec_workers.reallocation import ThroughputModel

# A CPU-like destination: re-prefilling costs 1 ms per context token.
CPU = ThroughputModel((0.02,) * 8, (1.0,) * 8, 0.001)


def report(name: str, per_token: float, rate: float | None = None) -> LoadReport:
    return LoadReport(worker=name, iteration=1, free_slots=4, kv_bytes_per_token=per_token,
                      kv_bytes_per_second=rate)  # fmt: skip


def test_auto_moves_kv_when_every_worker_has_the_path_and_it_is_cheaper() -> None:
    cost = migration_cost("auto", [report("a", 32768, 400e6), report("b", 32768, 200e6)])
    assert cost.kv_available and cost.kv_bandwidth_bytes_per_second == 200e6  # the slowest
    mode, seconds = cost.choose(200, CPU)
    assert mode == "kv_transfer"
    assert seconds < cost.recompute_seconds(200, CPU) / 5
    # The destination's engine is busy only for the copy, not for a 200-token prefill.
    assert cost.engine_seconds("kv_transfer", 200, CPU) < cost.engine_seconds("recompute", 200, CPU)


def test_recompute_is_chosen_when_the_kv_is_dearer_than_the_prefill() -> None:
    fast_prefill = ThroughputModel((0.02,) * 8, (1.0,) * 8, 1e-6)
    cost = migration_cost("auto", [report("a", 32768, 50e6), report("b", 32768, 50e6)])
    assert cost.choose(200, fast_prefill)[0] == "recompute"


def test_no_kv_path_on_one_worker_or_a_recompute_policy_means_recompute() -> None:
    assert not migration_cost("auto", [report("a", 32768), report("b", 0.0)]).kv_available
    assert (
        migration_cost("recompute", [report("a", 32768), report("b", 32768)]).choose(200, CPU)[0]
        == "recompute"
    )
    # Before any worker measured a rate, the prior prices the bytes.
    prior = migration_cost("kv_transfer", [report("a", 32768), report("b", 32768)])
    assert prior.kv_bandwidth_bytes_per_second == KV_PRIOR_BYTES_PER_SECOND
    assert prior.choose(200, CPU)[0] == "kv_transfer"


def test_one_step_table_pools_every_replica_s_measured_batches() -> None:
    from rlhfspec_workers.coordinator.reallocate import _speed

    small = LoadReport(worker="a", iteration=1, free_slots=0,
                       step_profile=[[8.0, 0.03, 1.0], [48.0, 0.09, 1.0]])  # fmt: skip
    large = LoadReport(worker="b", iteration=1, free_slots=0,
                       step_profile=[[48.0, 0.11, 1.0], [144.0, 0.25, 1.0]])  # fmt: skip
    alone = _speed([small])
    pooled = _speed([small, large])
    assert alone is not None and pooled is not None
    # Alone, the small-batch worker extrapolates its own slope and looks fast at 144.
    assert alone.step(144) < 0.25
    assert pooled.step(144) == 0.25 and pooled.step(48) == 0.10  # measured, median of both
    assert _speed([LoadReport(worker="c", iteration=1, free_slots=0)]) is None


def test_recompute_is_priced_at_the_measured_prefill_rate_once_reported() -> None:
    from rlhfspec_workers.coordinator.reallocate import _speed

    rows = [[8.0, 0.03, 1.0], [48.0, 0.09, 1.0]]
    unmeasured = _speed([LoadReport(worker="a", iteration=1, free_slots=0, step_profile=rows)])
    reports = [
        LoadReport(worker=name, iteration=1, free_slots=0, step_profile=rows,
                   prefill_seconds_per_token=rate)
        for name, rate in (("a", 4e-4), ("b", 6e-4))
    ]  # fmt: skip
    measured = _speed(reports)
    assert unmeasured is not None and measured is not None
    # Before a prefill is timed: the cheapest decode row, 0.09 s / 48.
    assert unmeasured.prefill_seconds_per_token == pytest.approx(0.09 / 48)
    assert measured.prefill_seconds_per_token == pytest.approx(5e-4)  # median of the reports
