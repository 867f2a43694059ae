"""Cost model: fitting, monotonicity, extrapolation, drafter costs, persistence, calibration."""

from __future__ import annotations

import json
import random

import pytest

from rlhfspec_workers.spec_decode.calibration_grid import calibration_batches, calibration_plan
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import OFF, CostSample, CostTableKey, DrafterCost
from rlhfspec_workers.spec_decode.synthetic_cost import (
    Roofline,
    drafter_from_roofline,
    synthetic_cost_model,
)

RF = Roofline(memory_floor_seconds=0.010, per_token_seconds=0.0002, overhead_seconds=0.001)


def roofline_samples(rf: Roofline, bs: list[int], ts: list[int]) -> list[CostSample]:
    return [CostSample(b, t, rf(b, t)) for b in bs for t in ts]


def test_grid_points_are_reproduced_and_repeats_use_the_median() -> None:
    samples = roofline_samples(RF, [1, 4, 16, 64], [1, 2, 5, 9])
    # A stalled outlier (x3, as on a shared machine) among three repeats must not move the cell.
    samples += [CostSample(16, 5, RF(16, 5)), CostSample(16, 5, 3 * RF(16, 5))]
    cm = CostModel.fit(samples)
    for b in (1, 4, 16, 64):
        for t in (1, 2, 5, 9):
            assert cm.verify_seconds(b, t - 1) == pytest.approx(RF(b, t), rel=1e-12)


def test_interpolation_lies_between_neighbours() -> None:
    cm = CostModel.fit(roofline_samples(RF, [1, 4, 16, 64], [1, 2, 5, 9]))
    for b in (2, 3, 8, 10, 40):
        for k in (0, 2, 3, 6):
            lo_b = max(x for x in (1, 4, 16, 64) if x <= b)
            hi_b = min(x for x in (1, 4, 16, 64) if x >= b)
            v = cm.verify_seconds(b, k)
            assert cm.verify_seconds(lo_b, k) <= v <= cm.verify_seconds(hi_b, k)


def test_monotone_in_batch_and_k_despite_noise() -> None:
    rng = random.Random(7)
    samples = [
        CostSample(b, t, RF(b, t) * rng.uniform(0.6, 1.6))
        for b in (1, 2, 4, 8, 16, 32, 64)
        for t in (1, 2, 3, 5, 9)
        for _ in range(2)
    ]
    cm = CostModel.fit(samples)
    # The raw data is not monotone (otherwise this test would prove nothing).
    raw = sorted((s.batch_size, s.tokens_per_seq, s.seconds) for s in samples)
    assert any(b1 == b2 and t1 < t2 and s1 > s2 for b1, t1, s1 in raw for b2, t2, s2 in raw)
    batches = [1, 2, 3, 5, 8, 13, 21, 34, 55, 64, 90, 128, 300]
    for k in range(0, 13):  # k > 8 is extrapolated in T
        col = [cm.verify_seconds(b, k) for b in batches]
        assert col == sorted(col), (k, col)
    for b in batches:
        row = [cm.verify_seconds(b, k) for k in range(0, 13)]
        assert row == sorted(row), (b, row)


def test_linear_extrapolation_beyond_grid_follows_compute_bound_slope() -> None:
    # Grid ends in the compute-bound regime (B*T*per_token > floor from B=64, T=1), so the
    # straight-line continuation must match the roofline itself beyond the grid.
    cm = CostModel.fit(roofline_samples(RF, [1, 8, 64, 128], [1, 2, 5, 9]))
    assert RF(64, 1) > RF.memory_floor_seconds + RF.overhead_seconds  # premise: compute-bound
    for b in (200, 256, 512):
        for t in (1, 5, 9):
            assert cm.verify_seconds(b, t - 1) == pytest.approx(RF(b, t), rel=1e-9)
    for t in (12, 17):  # past the largest measured T, at a compute-bound batch size
        assert cm.verify_seconds(128, t - 1) == pytest.approx(RF(128, t), rel=1e-9)
    # Below the smallest measured B: never cheaper than the smallest measurement.
    cm2 = CostModel.fit(roofline_samples(RF, [4, 16], [1, 2]))
    assert cm2.verify_seconds(1, 0) == pytest.approx(RF(4, 1))


def test_incomplete_rows_are_completed_and_still_monotone() -> None:
    samples = roofline_samples(RF, [1, 16], [1, 2, 5, 9]) + roofline_samples(RF, [64], [1, 9])
    cm = CostModel.fit(samples)
    assert cm.verify_seconds(64, 0) == pytest.approx(RF(64, 1))
    assert cm.verify_seconds(64, 8) == pytest.approx(RF(64, 9))
    row = [cm.verify_seconds(64, k) for k in range(9)]
    assert row == sorted(row)


def test_draft_costs_model_free_and_model_drafters() -> None:
    draft_rf = Roofline(memory_floor_seconds=0.002, per_token_seconds=0.00005, overhead_seconds=0)
    drafters = [
        DrafterCost("ngram", overhead_seconds=0.0003),
        drafter_from_roofline("small", draft_rf, [1, 4, 16, 64], overhead_seconds=0.0017),
    ]
    cm = CostModel.fit(roofline_samples(RF, [1, 4, 16, 64], [1, 2, 5, 9]), drafters)
    assert set(cm.drafters) == {"ngram", "small"}
    for b in (1, 16, 64):
        assert cm.draft_seconds("small", b, 0) == 0.0
        assert cm.draft_seconds("ngram", b, 0) == 0.0
        for k in (1, 4, 8):
            assert cm.draft_seconds("ngram", b, k) == pytest.approx(0.0003)
            assert cm.draft_seconds("small", b, k) == pytest.approx(0.0017 + k * draft_rf(b, 1))
            assert cm.step_seconds("small", b, k) == pytest.approx(
                cm.verify_seconds(b, k) + cm.draft_seconds("small", b, k)
            )
        # "off" ignores k: a plain decode step
        assert cm.step_seconds(OFF, b, 8) == pytest.approx(RF(b, 1))
    with pytest.raises(KeyError):
        cm.draft_seconds("never-calibrated", 4, 2)


def test_json_round_trip_preserves_predictions_and_key() -> None:
    key = CostTableKey("meta-llama/Llama-3.2-1B", "nvidia-h100 80GB")
    drafters = [
        DrafterCost("ngram", 0.0002),
        DrafterCost("eagle", 0.001, ((1, 0.0005), (64, 0.001))),
    ]
    rng = random.Random(3)
    samples = [
        CostSample(b, t, RF(b, t) * rng.uniform(0.9, 1.1)) for b, t in calibration_plan(64, 8)
    ]
    cm = CostModel(key, samples, drafters)
    text = cm.to_json()
    json.loads(text)  # plain JSON
    back = CostModel.from_json(text)
    assert back.key == key
    for b in (1, 3, 17, 64, 100):
        for k in (0, 1, 3, 8, 10):
            for d in ("ngram", "eagle", OFF):
                assert back.step_seconds(d, b, k) == cm.step_seconds(d, b, k)
    with pytest.raises(ValueError):
        CostModel.from_json(json.dumps({"schema": "something-else"}))


def test_cost_table_key_slug_is_safe_and_distinct() -> None:
    a = CostTableKey("org/model:v1", "H100 SXM")
    b = CostTableKey("org/model:v1", "A100")
    assert a.slug() == CostTableKey("org/model:v1", "H100 SXM").slug()
    assert a.slug() != b.slug()
    assert all(c.isalnum() or c in "._-" for c in a.slug())


@pytest.mark.parametrize(("max_batch", "max_k"), [(1, 1), (8, 4), (64, 8), (256, 8), (512, 16)])
def test_calibration_plan_is_small_and_covers_the_decision_space(
    max_batch: int, max_k: int
) -> None:
    plan = calibration_plan(max_batch, max_k)
    assert len(plan) == len(set(plan)) <= 20
    if max_batch >= 16:
        assert len(plan) >= 10
    bs = {b for b, _ in plan}
    ts = {t for _, t in plan}
    assert {1, max_batch} <= bs and {1, max_k + 1} <= ts
    assert len(plan) == len(bs) * len(ts)  # a full grid: no cell is extrapolated
    assert calibration_batches(max_batch)[0] == 1


def test_calibration_plan_is_cheap_and_sufficient() -> None:
    # A 120M Llama on a 2-core CPU took 11.4 ms at B=1 to 50 ms at B=64, T=1
    # (docs/cpu-notes.md §3): a roofline in that range.
    rf = Roofline(memory_floor_seconds=0.011, per_token_seconds=0.0007, overhead_seconds=0.0005)
    plan = calibration_plan(64, 8)
    repeats = 15  # per point, interleaved, with medians
    assert sum(rf(b, t) for b, t in plan) * repeats < 60.0
    # The plan's points alone reconstruct the surface where the selector looks: exactly away
    # from the roofline's knee, and at the knee (a sharp one: the worst case) only ever on the
    # safe side, overestimating a cost by a bounded amount.
    cm = CostModel.fit([CostSample(b, t, rf(b, t)) for b, t in plan])
    ratios = [cm.verify_seconds(b, k) / rf(b, k + 1) for b in range(1, 65) for k in range(9)]
    assert min(ratios) >= 1.0 - 1e-9
    assert max(ratios) <= 1.35
    assert sum(r < 1.01 for r in ratios) >= 0.8 * len(ratios)


def test_synthetic_cost_model_matches_roofline() -> None:
    cm = synthetic_cost_model(RF, max_batch=128, max_k=8)
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        for k in range(9):
            assert cm.verify_seconds(b, k) == pytest.approx(RF(b, k + 1), rel=1e-12)
    for b in (5, 7, 11, 23, 45, 100):  # between grid points: close to the formula
        for k in (0, 3, 8):
            assert cm.verify_seconds(b, k) == pytest.approx(RF(b, k + 1), rel=0.1)


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        CostSample(0, 1, 0.1)
    with pytest.raises(ValueError):
        CostSample(1, 1, float("nan"))
    with pytest.raises(ValueError):
        CostModel.fit([])
    with pytest.raises(ValueError):
        DrafterCost(OFF)
    with pytest.raises(ValueError):
        DrafterCost("d", -1.0)
    with pytest.raises(ValueError):
        CostModel.fit([CostSample(1, 1, 0.01)], [DrafterCost("d"), DrafterCost("d")])


def test_extrapolated_rows_never_cross() -> None:
    # B=1 grows steeply with T, B=64 is nearly flat but higher: straight-line continuations
    # past T=2 would cross near T=6, making a larger batch look cheaper.
    samples = [
        CostSample(1, 1, 0.010),
        CostSample(1, 2, 0.020),
        CostSample(64, 1, 0.050),
        CostSample(64, 2, 0.051),
    ]
    cm = CostModel.fit(samples)
    for k in range(0, 17):
        col = [cm.verify_seconds(b, k) for b in (1, 8, 32, 64, 128)]
        assert col == sorted(col), (k, col)
    assert cm.verify_seconds(1, 9) == pytest.approx(0.10)  # the B=1 row itself is unchanged


def test_drafter_cost_curve_is_robust_and_monotone() -> None:
    # Repeated, noisy per-token measurements: one stalled reading and a dip at B=16.
    points = ((1, 0.001), (1, 0.001), (1, 0.009), (4, 0.0012), (16, 0.0010), (64, 0.003))
    cm = CostModel.fit([CostSample(1, 1, 0.01)], [DrafterCost("d", 0.0, points)])
    assert cm.draft_seconds("d", 1, 1) == pytest.approx(0.001)  # median ignores the stall
    costs = [cm.draft_seconds("d", b, 1) for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert costs == sorted(costs)
