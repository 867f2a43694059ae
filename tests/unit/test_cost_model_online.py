"""Cost model beyond a full calibration: the fill of unmeasured cells (partial tables), online
learning from real steps, persistence of both, and the worker-side learner."""

from __future__ import annotations

import json
import math

import pytest

from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.generation.adaptive import CostLearner, expected_batch
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.spec_decode.calibration_grid import calibration_order, calibration_plan
from rlhfspec_workers.spec_decode.cost_model import UNMEASURED_DRAFT_SHARE, CostModel
from rlhfspec_workers.spec_decode.cost_online import FITTED_PRIOR, KNOWN_EVIDENCE, MEASURED_PRIOR
from rlhfspec_workers.spec_decode.cost_records import CostSample, CostTableKey, DrafterCost
from rlhfspec_workers.spec_decode.cost_surface import Surface
from rlhfspec_workers.spec_decode.synthetic_cost import Roofline

KEY = CostTableKey("m", "hw")
# Memory-bound until 50 tokens per step, then 0.2 ms per token (a GPU-like roofline) ...
GPU = Roofline(memory_floor_seconds=0.010, per_token_seconds=0.0002, overhead_seconds=0.001)
# ... and compute-bound almost from the start (a CPU running a larger model).
CPU = Roofline(memory_floor_seconds=0.001, per_token_seconds=0.003, overhead_seconds=0.03)
PLAN = calibration_plan(256, 8)
BATCHES = [1, 2, 3, 4, 8, 16, 24, 32, 64, 100, 128, 200, 256]


def partial(rf: Roofline, cells: int, **kw: object) -> CostModel:
    """A table whose calibration measured only the first `cells` cells of the plan."""
    measured = calibration_order(PLAN)[:cells]
    samples = [CostSample(b, t, rf(b, t)) for b, t in measured]
    return CostModel(KEY, samples, plan=PLAN, **kw)  # type: ignore[arg-type]


def assert_monotone(cm: CostModel, max_k: int = 8) -> None:
    for k in range(max_k + 1):
        col = [cm.verify_seconds(b, k) for b in BATCHES]
        assert col == sorted(col), (k, col)
    for b in BATCHES:
        row = [cm.verify_seconds(b, k) for k in range(max_k + 1)]
        assert row == sorted(row), (b, row)


def test_measuring_order_starts_with_the_corners() -> None:
    order = calibration_order(PLAN)
    assert sorted(order) == sorted(PLAN)
    assert order[:4] == [(1, 1), (1, 9), (256, 1), (256, 9)]
    # Then the middle batch size, before any finer B or any middle T.
    assert order[4:6] == [(16, 1), (16, 9)]


@pytest.mark.parametrize("rf", [GPU, CPU], ids=["gpu-like", "cpu-like"])
def test_corners_alone_give_a_monotone_table_that_covers_the_plan(rf: Roofline) -> None:
    cm = partial(rf, 4)
    assert cm.partial
    assert sorted(cm.missing()) == sorted(set(PLAN) - set(calibration_order(PLAN)[:4]))
    assert cm.measured(256, 9) and not cm.measured(16, 5)
    # The fill passes through the measurements ...
    for b, t in calibration_order(PLAN)[:4]:
        assert cm.verify_seconds(b, t - 1) == pytest.approx(rf(b, t), rel=1e-4)
    # ... is monotone everywhere the selector may look ...
    assert_monotone(cm)
    # ... and close to the truth: within -10% (never much cheaper, the costly mistake) and
    # +60% (a chord over a roofline knee overestimates; the safe side).
    for b in BATCHES:
        for k in range(9):
            ratio = cm.verify_seconds(b, k) / rf(b, k + 1)
            assert 0.9 <= ratio <= 1.6, (b, k, ratio)


def test_more_measured_cells_only_improve_the_fill() -> None:
    def worst(cm: CostModel) -> float:
        return max(
            abs(math.log(cm.verify_seconds(b, k) / GPU(b, k + 1)))
            for b in BATCHES
            for k in (0, 4, 8)
        )

    errors = [worst(partial(GPU, n)) for n in (4, 12, len(PLAN))]
    assert errors[0] >= errors[1] - 1e-9 and errors[1] >= errors[2] - 1e-9
    assert not partial(GPU, len(PLAN)).partial


def test_surface_prefers_the_costlier_fit_when_the_points_cannot_tell() -> None:
    # Three corners of the GPU roofline: B = 1 flat in T (memory-bound), B = 256 at T = 1. Both
    # "T is free" (t(256, 9) = t(256, 1)) and "cost grows with B x T past a knee" fit them
    # exactly; the second is the safe guess for (256, 9), and the roofline's truth. The knee
    # itself is not determined: anything from 9 to ~50 tokens fits.
    cells = {(b, t): GPU(b, t) for b, t in [(1, 1), (1, 9), (256, 1)]}
    surface = Surface.fit(cells, [(256, 9), (16, 5)])
    assert 0.8 * GPU(256, 9) <= surface(256, 9) <= 1.5 * GPU(256, 9)
    assert surface(256, 9) > 5 * GPU(256, 1)
    for (b, t), s in cells.items():
        assert surface(b, t) == pytest.approx(s, rel=0.05)  # within the tie tolerance
    one = Surface.fit({(1, 1): 0.01})
    assert one(1, 1) == pytest.approx(0.01) and one(256, 9) > one(1, 1)


def test_online_observations_move_the_table_towards_real_costs() -> None:
    cm = partial(CPU, 4)
    before = {(b, k): cm.verify_seconds(b, k) for b in (16, 200) for k in (0, 4)}
    assert cm.measured(256, 1) and cm.measured(1, 1) and not cm.measured(16, 5)
    # Real steps at B = 16, k = 4 cost 1.5x what the table says (longer contexts than the
    # probes had, say).
    truth = 1.5 * before[(16, 4)]
    for _ in range(400):
        cm.observe_verify(16, 5.0, truth)
    cm.refresh()
    assert cm.verify_seconds(16, 4) == pytest.approx(truth, rel=0.05)
    assert cm.observations == 400
    # A measured cell hears no fitted cell's correction (a fill error is not the machine's);
    # the fitted cells around the observations follow them, less the farther they are.
    assert cm.verify_seconds(256, 0) == pytest.approx(CPU(256, 1), rel=1e-9)
    assert cm.verify_seconds(1, 0) == pytest.approx(CPU(1, 1), rel=1e-9)
    assert before[(200, 0)] <= cm.verify_seconds(200, 0) < 1.5 * before[(200, 0)]
    assert_monotone(cm)
    # The calibrated surface itself is kept apart (it is what observations are compared to).
    assert cm.calibrated_seconds(16, 5) == pytest.approx(before[(16, 4)], rel=1e-9)


@pytest.mark.parametrize("rf", [GPU, CPU])
def test_fractional_token_queries_read_the_surface_between_and_past_the_grid(
    rf: Roofline,
) -> None:
    """The selector's fractional-T queries take a per-batch column of the grid (bilinear
    along B first); they must read the same surface as ``grid_value`` does, before and after
    online evidence reshapes it, inside the grid's T range and past it."""
    from rlhfspec_workers.spec_decode.cost_surface import grid_value

    cm = partial(rf, 6)
    for b, tokens, truth in ((16, 5.0, 1.5), (200, 2.0, 0.7), (3, 9.0, 1.3)):
        for _ in range(50):
            cm.observe_verify(b, tokens, truth * cm.calibrated_seconds(b, tokens))
        for b_query in (1, 2, 3, 7, 16, 100, 256, 400):
            for t in (1.0, 1.37, 2.5, 4.999, 8.2, 9.0, 11.5):
                query = cm._query
                want = grid_value(query.bs, query.ts, query.grid, float(b_query), t)
                assert cm.verify_tokens_seconds(b_query, t) == pytest.approx(want, rel=1e-12)
        cm.refresh()
    assert cm._query.separable  # the fast path was the one tested


def test_measured_cells_need_more_evidence_than_fitted_ones() -> None:
    cm = partial(CPU, 4)  # (1, 1) measured, (16, 5) fitted
    moved = {}
    for b, t in [(1, 1), (16, 5)]:
        base = cm.verify_seconds(b, t - 1)
        for _ in range(4):
            cm.observe_verify(b, float(t), 1.5 * base)
        cm.refresh()
        moved[(b, t)] = cm.verify_seconds(b, t - 1) / base
    assert 1.0 < moved[(1, 1)] < moved[(16, 5)] <= 1.5
    assert MEASURED_PRIOR > FITTED_PRIOR


def test_one_stalled_step_moves_a_cell_by_at_most_the_clip() -> None:
    cm = partial(CPU, len(PLAN))
    base = cm.verify_seconds(64, 4)
    cm.observe_verify(64, 5.0, 50 * base)  # e.g. a step that also prefilled many prompts
    cm.refresh()
    assert base < cm.verify_seconds(64, 4) < 2.0 * base
    # Garbage is ignored.
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        cm.observe_verify(64, 5.0, bad)
    cm.observe_verify(0, 5.0, 1.0)
    assert cm.observations == 1


def test_a_consistently_wrong_fill_is_corrected_within_a_few_steps() -> None:
    # One measured cell: the fill's guess at B = 16 is ~18x too high. Real steps there are
    # not outliers to clip once they keep saying the same.
    cm = CostModel(KEY, [CostSample(1, 1, 0.07)], plan=calibration_plan(90, 8))
    truth = 0.06 + 0.0012 * 16 * 5
    assert cm.verify_seconds(16, 4) > 10 * truth
    for _ in range(10):
        cm.observe_verify(16, 5.0, truth)
    cm.refresh()
    assert cm.verify_seconds(16, 4) < 2.0 * truth
    for _ in range(30):
        cm.observe_verify(16, 5.0, truth)
    cm.refresh()
    assert cm.verify_seconds(16, 4) == pytest.approx(truth, rel=0.1)


def test_online_evidence_marks_fitted_cells_known() -> None:
    cm = partial(CPU, 4)
    assert (16, 5) in cm.missing()
    for _ in range(int(KNOWN_EVIDENCE) + 20):
        cm.observe_verify(16, 5.0, CPU(16, 5))
    assert (16, 5) not in cm.missing()
    assert cm.evidence(16, 5) >= KNOWN_EVIDENCE


def test_partial_table_round_trips_through_json_with_its_online_state() -> None:
    drafters = [DrafterCost("draft", 0.0, ((1, 0.002),)), DrafterCost("ngram", 0.0001)]
    cm = partial(CPU, 6, drafters=drafters, drafter_plan={"draft": [1, 16, 256]})
    cm.bookkeeping = ((1, 0.0004),)
    for _ in range(50):
        cm.observe_verify(64, 3.0, 2 * CPU(64, 3))
    cm.refresh()  # fold the observations since the last rebuild (a reload does)
    text = cm.to_json()
    doc = json.loads(text)
    assert doc["partial"] is True
    measured = {(b, t) for b, t, _ in doc["verify"]}
    fitted = {tuple(c) for c in doc["plan"]} - measured
    assert measured == set(calibration_order(PLAN)[:6]) and fitted
    assert doc["online"]
    back = CostModel.from_json(text)
    assert back.partial and back.missing() == cm.missing()
    assert back.missing_drafter_batches() == {"draft": (16, 256)}
    assert back.bookkeeping == ((1, 0.0004),)
    for b in (1, 7, 64, 100, 256, 300):
        for k in (0, 2, 8):
            for d in ("draft", "ngram", "off"):
                assert back.step_seconds(d, b, k) == pytest.approx(cm.step_seconds(d, b, k))
    # Learning goes on after a reload.
    back.observe_verify(64, 3.0, 2 * CPU(64, 3))
    assert back.observations == 1


def test_version_1_documents_still_load() -> None:
    doc = {
        "schema": "rlhfspec.spec_decode.cost_model/v1",
        "key": {"model_id": "m", "hardware_id": "hw"},
        "verify": [[1, 1, 0.01], [1, 5, 0.02], [64, 1, 0.03], [64, 5, 0.09]],
        "drafters": [{"name": "ngram", "overhead_seconds": 0.0, "per_token": []}],
    }
    cm = CostModel.from_json(json.dumps(doc))
    assert not cm.partial and cm.verify_seconds(64, 4) == pytest.approx(0.09)


def test_a_later_calibration_continues_a_partial_table() -> None:
    cm = partial(CPU, 4, drafter_plan={"draft": [1, 256]}, drafters=[DrafterCost("draft")])
    for _ in range(30):
        cm.observe_verify(256, 9.0, CPU(256, 9))
    todo = cm.missing()
    more = [CostSample(b, t, CPU(b, t)) for b, t in todo[:5]]
    nxt = cm.extended(more, [DrafterCost("draft", 0.0, ((1, 0.001),))], bookkeeping=[(1, 1e-4)])
    assert len(nxt.samples) == 9
    assert nxt.missing() == todo[5:]
    assert nxt.missing_drafter_batches() == {"draft": (256,)}
    assert nxt.evidence(256, 9) == pytest.approx(cm.evidence(256, 9))
    assert nxt.bookkeeping == ((1, 1e-4),)


def test_unmeasured_drafters_are_never_free() -> None:
    drafters = [DrafterCost("planned"), DrafterCost("model_free", 0.0002), DrafterCost(
        "one_point", 0.0, ((1, 0.004),)
    )]  # fmt: skip
    cm = partial(CPU, len(PLAN), drafters=drafters, drafter_plan={"planned": [1, 256]})
    for b in (1, 64, 256):
        plain = cm.verify_seconds(b, 0)
        assert cm.draft_seconds("planned", b, 2) == pytest.approx(
            2 * UNMEASURED_DRAFT_SHARE * plain
        )
        assert cm.draft_seconds("model_free", b, 2) == pytest.approx(0.0002)
        # One measured batch size: scaled like a plain decode step.
        expected = 0.004 * plain / cm.verify_seconds(1, 0)
        assert cm.draft_seconds("one_point", b, 1) == pytest.approx(expected)


def _step(batch: int, k: int, seconds: float, next_k: int = 0, drafter: str = "off") -> StepRecord:
    return StepRecord(
        step=0,
        batch_size=batch,
        num_finished=0,
        drafter=drafter if k else "off",
        k=k,
        num_drafts=batch if k else 0,
        num_draft_tokens=batch * k,
        num_accepted_tokens=0,
        accepted_per_pos=(),
        drafted_per_pos=(),
        proposer_draft_tokens=0,
        proposer_accepted_tokens=0,
        next_drafter=drafter if next_k else "off",
        next_k=next_k,
        next_draft_tokens=batch * next_k,
        step_seconds=seconds,
        draft_seconds=0.0,
    )


def test_learner_feeds_steps_and_saves_now_and_then() -> None:
    cm = partial(CPU, 4, drafters=[DrafterCost("draft", 0.001)])
    saved: list[str] = []
    now = [0.0]
    learner = CostLearner(
        cm, lambda m: saved.append(m.to_json()), save_every_seconds=10.0, min_steps=5,
        clock=lambda: now[0],
    )  # fmt: skip
    truth = 2.0 * cm.verify_seconds(32, 3)
    for _ in range(300):
        # Verify k = 3 at B = 32 and draft the next k = 3 (the table's 3 ms is taken off).
        learner.observe_step(_step(32, 3, truth + cm.draft_seconds("draft", 32, 3), 3, "draft"))
    assert learner.steps == 300 and not saved  # the clock has not moved
    now[0] = 11.0
    learner.observe_step(_step(32, 3, truth + cm.draft_seconds("draft", 32, 3), 3, "draft"))
    assert len(saved) == 1 and learner.saves == 1
    assert cm.verify_seconds(32, 3) == pytest.approx(truth, rel=0.05)
    assert json.loads(saved[0])["online"]
    learner.save_now()  # nothing new since
    assert len(saved) == 1
    # Rows without drafts count as one token: 16 of 32 rows drafted 4 -> T = 3.
    step = _step(32, 4, truth)
    step = StepRecord(**{**step.__dict__, "num_draft_tokens": 64})
    before = cm.evidence(32, 3.0)
    learner.observe_step(step)
    assert cm.evidence(32, 3.0) > before


def test_learner_survives_a_failing_cache_write() -> None:
    cm = partial(CPU, 4)

    def broken(_: CostModel) -> None:
        raise OSError("disk full")

    learner = CostLearner(cm, broken, save_every_seconds=0.0, min_steps=1)
    learner.observe_step(_step(8, 0, cm.verify_seconds(8, 0)))
    assert learner.saves == 0 and learner.steps == 1


def test_expected_batch_is_the_workers_share_within_its_slots() -> None:
    spec = RLHFJobSpec.model_validate(
        {
            "models": {"policy": {"path": "tiny://policy"}},
            "dataset": {"path": "tiny://dataset/train.jsonl"},
            "algorithm": {"promptsPerIteration": 10, "samplesPerPrompt": 8},
            "generation": {"replicas": 3},
        }
    )
    assert expected_batch(spec, 256) == 27
    assert expected_batch(spec, 16) == 16
