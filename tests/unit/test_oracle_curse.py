"""The oracle's winner's curse (``benchmarks.oracle_curse``): the oracle judged by costs
measured apart from those it is charged, on hand-made traces and runs whose answer can be
worked out."""

from __future__ import annotations

import pytest

from rlhfspec_workers.benchmarks.hindsight_oracle import IterationTraces
from rlhfspec_workers.benchmarks.oracle_curse import halves, summary, winners_curse
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import CostSample, CostTableKey, DrafterCost
from rlhfspec_workers.spec_decode.hindsight import OFF, SequenceTrace, StepCost, replay_oracle

# Four sequences of 13 tokens; the n-gram drafter gets its first draft token right everywhere.
SEQS = [SequenceTrace(f"s{i}", 1, 13, {"ngram": [1] * 12}) for i in range(4)]


def prices(ngram: float, off: float) -> StepCost:
    def cost(drafter: str, batch: int, k: int) -> float:
        return off if drafter == OFF or k == 0 else ngram

    return cost


def record(k: int, seconds: float) -> StepRecord:
    return StepRecord(
        step=0, batch_size=4, num_finished=0, drafter="ngram" if k else "off", k=k,
        num_drafts=4 if k else 0, num_draft_tokens=4 * k, num_accepted_tokens=0,
        accepted_per_pos=(), drafted_per_pos=(), proposer_draft_tokens=4 * k,
        proposer_accepted_tokens=0, next_drafter="ngram" if k else "off", next_k=k,
        next_draft_tokens=4 * k, step_seconds=seconds, draft_seconds=0.0,
    )  # fmt: skip


def test_an_oracle_judging_by_other_costs_is_charged_its_choices() -> None:
    # Drafting emits 2 tokens a row for 0.10 s, plain decoding 1 for 0.06 s: drafting pays.
    truth = prices(0.10, 0.06)
    own = replay_oracle(SEQS, truth, [("ngram", 2)])
    assert set(own.choices) == {("ngram", 2)}
    same = replay_oracle(SEQS, truth, [("ngram", 2)], choose_cost=truth)
    assert (same.seconds, same.choices) == (own.seconds, own.choices)
    # Judged by costs that priced drafting at 0.14 s, it decodes plainly and pays for it.
    wrong = replay_oracle(SEQS, truth, [("ngram", 2)], choose_cost=prices(0.14, 0.06))
    assert set(wrong.choices) == {(OFF, 0)}
    assert wrong.tokens == own.tokens
    assert wrong.seconds == pytest.approx(12 * 0.06)
    assert own.seconds == pytest.approx(6 * 0.10)


def test_halves_split_each_fixed_configurations_runs_in_the_order_they_ran() -> None:
    a, b, c = [record(2, 0.1)], [record(2, 0.2)], [record(2, 0.3)]
    runs = [("fixed:ngram:2", a), ("k0", a), ("ours", a), ("fixed:ngram:2", b), ("k0", b)]
    runs.append(("fixed:ngram:2", c))
    split = halves(runs)
    assert split is not None
    first, last = split
    assert first == [("fixed:ngram:2", a), ("k0", a)]  # "ours" is not a fixed configuration
    assert last == [("fixed:ngram:2", b), ("fixed:ngram:2", c), ("k0", b)]
    assert halves([("fixed:ngram:2", a), ("k0", a), ("k0", b)]) is None  # ngram ran once


def model() -> CostModel:
    samples = [CostSample(b, t, 0.05) for b in (1, 4) for t in (1, 3)]
    return CostModel(CostTableKey("m", "hw"), samples, [DrafterCost("ngram", 0.0)])


def test_the_curse_is_what_choosing_by_the_other_halfs_costs_loses() -> None:
    # The first runs measured drafting at 0.10 s a step (it pays), the last at 0.14 s (it
    # does not); plain decoding at 0.06 s both times.
    runs = [
        ("fixed:ngram:2", [record(2, 0.10)] * 6),
        ("k0", [record(0, 0.06)] * 12),
        ("fixed:ngram:2", [record(2, 0.14)] * 6),
        ("k0", [record(0, 0.06)] * 12),
    ]
    doc = winners_curse([IterationTraces(SEQS, lambda: None)], runs, model(), [("ngram", 2)])
    assert doc is not None
    first, last = doc["halves"]
    tokens = 4 * 12
    # Charged by the first half: its own oracle drafts (0.6 s); judged by the last, it
    # decodes plainly (0.72 s).
    assert first["same_half"] == pytest.approx(tokens / 0.6, rel=1e-3)
    assert first["other_half"] == pytest.approx(tokens / 0.72, rel=1e-3)
    assert first["kept"] == pytest.approx(0.6 / 0.72, abs=1e-3)
    # Charged by the last half: plain decoding is right, and judged by the first half the
    # oracle drafts at 0.14 s a step (0.84 s).
    assert last["same_half"] == pytest.approx(tokens / 0.72, rel=1e-3)
    assert last["other_half"] == pytest.approx(tokens / 0.84, rel=1e-3)
    assert doc["kept"] < 1.0
    assert "keeps" in summary(doc)[0]
    # Halves that agree lose nothing.
    agree = [runs[0], runs[1], runs[0], runs[1]]
    same = winners_curse([IterationTraces(SEQS, lambda: None)], agree, model(), [("ngram", 2)])
    assert same is not None and same["kept"] == 1.0
    assert summary(None) == []
