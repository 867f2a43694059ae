"""The true hindsight oracle's replay (``spec_decode.hindsight``) and its report
(``benchmarks.hindsight_oracle``) on hand-made traces whose answers can be worked out."""

from __future__ import annotations

import random

import pytest

from replay_helpers import linear_cost
from rlhfspec_workers.benchmarks.hindsight_oracle import (
    IterationTraces,
    measured_cost,
    oracle_report,
)
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.spec_decode.hindsight import (
    OFF,
    SequenceTrace,
    Step,
    StepTiming,
    charged_seconds,
    replay_fixed,
    replay_oracle,
    step_cost_table,
)


def trace(key: str, length: int, matches: dict[str, list[int]], start: int = 1) -> SequenceTrace:
    return SequenceTrace(key, start, length, matches)


def test_off_replay_takes_one_step_per_token() -> None:
    seqs = [trace("a", 6, {}), trace("b", 3, {})]
    out = replay_fixed(seqs, linear_cost, (OFF, 0))
    # a emits 5 tokens after the first (one step each); b ends after 2.
    assert out.steps == 5
    assert out.tokens == 5 + 2
    assert out.accepted == 0
    expected = 2 * linear_cost(OFF, 2, 0) + 3 * linear_cost(OFF, 1, 0)
    assert out.seconds == pytest.approx(expected)


def test_fixed_replay_accepts_the_match_length_capped_by_k_and_the_end() -> None:
    # At every position the drafter would get 3 tokens right.
    seq = trace("a", 9, {"ngram": [3] * 8})
    out = replay_fixed([seq], linear_cost, ("ngram", 2))
    # Each step emits 1 + min(2, 3) = 3 tokens: positions 1 -> 4 -> 7 -> 9 (capped at the end).
    assert out.steps == 3
    assert out.tokens == 8
    assert out.accepted == 8 - 3


def test_oracle_switches_per_step_and_beats_every_fixed_strategy() -> None:
    rng = random.Random(0)
    # Drafts that pay only in bursts (copying phases), differently for the two drafters.
    seqs = []
    for i in range(12):
        length = rng.randint(10, 60)
        ngram = [4 if (p // 8) % 2 == 0 else 0 for p in range(length)]
        suffix = [rng.choice([0, 0, 1, 2]) for _ in range(length)]
        seqs.append(trace(f"s{i}", length, {"ngram": ngram, "suffix": suffix}))
    strategies = [(d, k) for d in ("ngram", "suffix") for k in (1, 2, 4)]
    oracle = replay_oracle(seqs, linear_cost, strategies)
    fixed = [replay_fixed(seqs, linear_cost, s) for s in [(OFF, 0), *strategies]]
    assert all(oracle.tokens_per_second >= f.tokens_per_second - 1e-9 for f in fixed)
    assert oracle.tokens_per_second > max(f.tokens_per_second for f in fixed)
    assert len(oracle.choices) > 1  # it did switch
    assert oracle.tokens == fixed[0].tokens  # every schedule emits the same tokens


def test_oracle_stops_drafting_when_nothing_matches() -> None:
    seqs = [trace(f"s{i}", 20, {"ngram": [0] * 20}) for i in range(4)]
    oracle = replay_oracle(seqs, linear_cost, [("ngram", 2)])
    assert set(oracle.choices) == {(OFF, 0)}


def test_step_cost_table_interpolates_measured_batches_and_falls_back() -> None:
    records = [
        StepTiming(("ngram", 2), 4, 0.2),
        StepTiming(("ngram", 2), 4, 0.4),
        StepTiming(("ngram", 2), 8, 0.5),
    ]
    cost = step_cost_table(records, lambda d, b, k: 99.0)
    assert cost("ngram", 4, 2) == pytest.approx(0.3)
    assert cost("ngram", 6, 2) == pytest.approx(0.4)
    assert cost("ngram", 1, 2) == pytest.approx(0.3)  # nearest measured size outside
    assert cost("ngram", 64, 2) == pytest.approx(0.5)
    assert cost("suffix", 4, 2) == 99.0
    assert cost("ngram", 4, 0) == 99.0  # k=0 is plain decoding, whatever the drafter


def test_measured_cost_reads_fixed_runs_and_the_undrafted_first_step() -> None:
    def step(batch: int, k: int, seconds: float) -> StepRecord:
        return StepRecord(
            step=0,
            batch_size=batch,
            num_finished=0,
            drafter="ngram" if k else "off",
            k=k,
            num_drafts=batch if k else 0,
            num_draft_tokens=batch * k,
            num_accepted_tokens=0,
            accepted_per_pos=(),
            drafted_per_pos=(),
            proposer_draft_tokens=batch * k,
            proposer_accepted_tokens=0,
            next_drafter="ngram",
            next_k=2,
            next_draft_tokens=0,
            step_seconds=seconds,
            draft_seconds=0.0,
        )

    runs = [
        ("fixed:ngram:2", [step(4, 0, 0.1), step(4, 2, 0.3)]),
        ("ours", [step(4, 2, 9.0)]),  # not a fixed strategy: ignored
    ]
    cost = measured_cost(runs, lambda d, b, k: -1.0)
    assert cost("ngram", 4, 2) == pytest.approx(0.3)
    assert cost(OFF, 4, 0) == pytest.approx(0.1)


def test_a_step_is_charged_for_the_draft_tokens_it_verifies() -> None:
    # suffix:4 at 4 rows was measured at 0.30 s on steps verifying 4 draft tokens on
    # average; one more draft token costs 0.01 s there; plain decoding costs 0.25 s.
    records = [
        StepTiming(("suffix", 4), 4, 0.28, 2),
        StepTiming(("suffix", 4), 4, 0.32, 6),
        StepTiming((OFF, 0), 4, 0.25),
        StepTiming(("draft_model", 2), 4, 0.40, 8),
    ]
    cost = step_cost_table(records, lambda d, b, k: 99.0, token_seconds=lambda b: 0.01)
    assert cost.for_tokens("suffix", 4, 4, 4) == pytest.approx(0.30)  # the mean fill
    assert cost.for_tokens("suffix", 4, 4, 12) == pytest.approx(0.38)  # every row drafts 3
    assert cost.for_tokens("suffix", 4, 4, 0) == pytest.approx(0.26)
    assert cost.for_tokens("suffix", 4, 4, None) == pytest.approx(0.30)  # lengths unknown
    # Never below plain decoding at that batch size.
    cheap = step_cost_table(records, lambda d, b, k: 99.0, token_seconds=lambda b: 0.05)
    assert cheap.for_tokens("suffix", 4, 4, 0) == pytest.approx(0.25)
    # Without a token price, or without recorded fills: the measured mean.
    blind = step_cost_table(records, lambda d, b, k: 99.0)
    assert blind.for_tokens("suffix", 4, 4, 12) == pytest.approx(0.30)

    # A replayed step knows a model-free drafter's draft lengths (trace or live replay) ...
    seqs = [
        SequenceTrace(f"s{i}", 1, 9, {"suffix": [1] * 8}, {"suffix": [n] * 8})
        for i, n in enumerate((0, 1, 4, 8))
    ]
    step = Step([(seq, 1) for seq in seqs], {})
    assert step.drafted(("suffix", 4)) == 0 + 1 + 4 + 4
    assert step.drafted((OFF, 0)) == 0
    assert charged_seconds(cost, step, ("suffix", 4)) == pytest.approx(0.30 + 0.01 * (9 - 4))
    live = Step(step.live, {"suffix": [0] * 4}, {"suffix": [2] * 4})
    assert live.drafted(("suffix", 4)) == 8
    # ... and not a draft model's, which always fills its k: charged the measured mean.
    assert step.drafted(("draft_model", 2)) is None
    assert charged_seconds(cost, step, ("draft_model", 2)) == pytest.approx(0.40)


def test_the_oracle_pays_for_the_drafts_it_verifies() -> None:
    # Every row has a 4-token suffix draft of which 1 token is right. Charged by the measured
    # mean fill (1 token a row), suffix:4 would pay; charged for its 4 tokens a row, not.
    seqs = [
        SequenceTrace(f"s{i}", 1, 21, {"suffix": [1] * 20}, {"suffix": [4] * 20}) for i in range(4)
    ]
    records = [StepTiming((OFF, 0), b, 0.10) for b in range(1, 5)] + [
        StepTiming(("suffix", 4), b, 0.12, b) for b in range(1, 5)
    ]
    blind = step_cost_table(records, lambda d, b, k: 99.0)
    priced = step_cost_table(records, lambda d, b, k: 99.0, token_seconds=lambda b: 0.02)
    assert set(replay_oracle(seqs, blind, [("suffix", 4)]).choices) == {("suffix", 4)}
    assert set(replay_oracle(seqs, priced, [("suffix", 4)]).choices) == {(OFF, 0)}
    fixed = replay_fixed(seqs, priced, ("suffix", 4))
    # 4 rows x 4 draft tokens against the 4 the measured steps verified at 4 rows.
    assert fixed.steps == 10
    assert fixed.seconds == pytest.approx(10 * (0.12 + 0.02 * (16 - 4)))


def test_report_puts_the_oracle_in_measured_currency_and_flags_a_shortfall() -> None:
    seqs = [trace(f"s{i}", 30, {"ngram": [2] * 30}) for i in range(4)]
    its = [IterationTraces(seqs, lambda: None)]
    strategies = [("ngram", 2)]
    replayed_fixed = replay_fixed(seqs, linear_cost, ("ngram", 2)).tokens_per_second
    replayed_off = replay_fixed(seqs, linear_cost, (OFF, 0)).tokens_per_second
    # Measured runs were half as fast as the replay says: the oracle is scaled by 0.5.
    measured = {"k0": replayed_off / 2, "fixed:ngram:2": replayed_fixed / 2}
    doc = oracle_report(its, linear_cost, strategies, measured, [{"off": replayed_off / 2}])
    assert doc["scale"] == pytest.approx(0.5, abs=1e-3)
    assert doc["best_fixed"] == "fixed:ngram:2"
    assert doc["at_or_above_fixed"] is True
    assert doc["over_best_fixed"] >= 1.0 - 1e-3
    assert doc["iterations"][0]["over_off"] > 1.0
    # A measured fixed configuration far above the replay means the replay misses something.
    measured["fixed:ngram:2"] = replayed_fixed * 3
    doc = oracle_report(its, linear_cost, strategies, measured)
    assert doc["at_or_above_fixed"] is False


def test_the_lookahead_oracle_never_finishes_later_than_the_greedy_one() -> None:
    # Every schedule emits the same tokens: the better one takes less time. Over batches
    # with bursty, differently paying drafters, looking ahead in the tail (here: always)
    # never loses to choosing each step's best rate, and wins somewhere.
    strategies = [(d, k) for d in ("ngram", "suffix") for k in (1, 2, 4)]
    gains = []
    for seed in range(8):
        rng = random.Random(seed)
        seqs = []
        for i in range(8):
            length = rng.randint(5, 40)
            ngram = [rng.choice([0, 4, 4]) if (p // 5) % 2 else 0 for p in range(length)]
            suffix = [rng.choice([0, 1, 2, 3]) for _ in range(length)]
            seqs.append(trace(f"s{i}", length, {"ngram": ngram, "suffix": suffix}))
        greedy = replay_oracle(seqs, linear_cost, strategies, lookahead_batch=0)
        ahead = replay_oracle(seqs, linear_cost, strategies, lookahead_batch=8)
        assert ahead.tokens == greedy.tokens
        assert ahead.seconds <= greedy.seconds + 1e-12
        gains.append(greedy.seconds - ahead.seconds)
    assert max(gains) > 0


def test_the_report_keeps_a_fixed_schedule_that_beats_the_oracles_own() -> None:
    # 16 samples one token from their end and a straggler that drafts 4 right everywhere.
    # At 17 live sequences (above the lookahead) the best rate is plain decoding, but drafting
    # there would have saved the straggler a whole step of its tail: fixed ngram:4 finishes
    # sooner, and the report keeps its schedule.
    def cost(drafter: str, batch: int, k: int) -> float:
        drafting = k > 0 and drafter != OFF
        return (0.1 if batch > 1 else 0.04) + (0.03 if batch > 1 else 0.01) * drafting

    seqs = [trace(f"s{i}", 2, {"ngram": [0, 0]}) for i in range(16)]
    seqs.append(trace("straggler", 23, {"ngram": [4] * 23}))
    strategies = [("ngram", 4)]
    own = replay_oracle(seqs, cost, strategies)
    fixed = replay_fixed(seqs, cost, ("ngram", 4))
    # Plain decoding first (the best rate), then 4 drafting steps and a last plain one.
    assert own.choices == {(OFF, 0): 2, ("ngram", 4): 4}
    assert own.seconds == pytest.approx(0.1 + 4 * 0.05 + 0.04)
    assert fixed.seconds == pytest.approx(0.13 + 4 * 0.05)
    report = oracle_report([IterationTraces(seqs, lambda: None)], cost, strategies, {})
    assert report["fixed_won"] == 1
    assert report["replayed_tokens_per_second"] == pytest.approx(fixed.tokens_per_second, abs=0.01)
    assert report["choices"] == {"ngram:4": fixed.steps}
