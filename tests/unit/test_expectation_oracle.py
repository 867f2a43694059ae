"""The expectation oracle: its pure replay (``spec_decode.hindsight.replay_expected_oracle``)
on hand-made traces, and the target probabilities it reads (``benchmarks.expectation_oracle``)
against an unbatched computation on the tiny policy."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from replay_helpers import linear_cost
from rlhfspec_workers.benchmarks.expectation_oracle import (
    DraftProbabilities,
    ExpectedDrafts,
    PooledExpectation,
    PooledMeans,
    calibration,
    summary,
)
from rlhfspec_workers.drafters.base import DraftRow
from rlhfspec_workers.generation.shadow import ShadowDrafts
from rlhfspec_workers.spec_decode.hindsight import (
    OFF,
    SequenceTrace,
    Step,
    replay_expected_oracle,
    replay_fixed,
    replay_oracle,
)


def bursty_traces(seed: int) -> list[SequenceTrace]:
    rng = random.Random(seed)
    seqs = []
    for i in range(10):
        length = rng.randint(10, 50)
        ngram = [4 if (p // 6) % 2 == 0 else 0 for p in range(length)]
        suffix = [rng.choice([0, 0, 1, 3]) for _ in range(length)]
        seqs.append(SequenceTrace(f"s{i}", 1, length, {"ngram": ngram, "suffix": suffix}))
    return seqs


def realized_curves(step: Step) -> Mapping[str, Sequence[Sequence[float]]]:
    """'Expectations' equal to what the drafts really got: curve[k] = min(k, match)."""
    out: dict[str, list[list[float]]] = {}
    for drafter in ("ngram", "suffix"):
        out[drafter] = [
            [float(min(k, seq.matched(drafter, pos))) for k in range(9)] for seq, pos in step.live
        ]
    return out


STRATEGIES = [(d, k) for d in ("ngram", "suffix") for k in (1, 2, 4)]


def test_knowing_every_outcome_the_expectation_oracle_is_the_greedy_true_oracle() -> None:
    seqs = bursty_traces(0)
    true = replay_oracle(seqs, linear_cost, STRATEGIES, lookahead_batch=0)
    same = replay_expected_oracle(seqs, linear_cost, STRATEGIES, realized_curves)
    assert same.tokens == true.tokens
    assert same.seconds == pytest.approx(true.seconds)
    assert same.choices == true.choices


def test_it_chooses_by_expectation_and_is_scored_on_what_drafts_got() -> None:
    seqs = bursty_traces(1)

    def ngram_looks_best(step: Step) -> Mapping[str, Sequence[Sequence[float]]]:
        # ngram expected to get everything, suffix nothing: it always picks ngram at the
        # largest k, whatever the drafts really get.
        n = len(step.live)
        return {"ngram": [[float(k) for k in range(5)]] * n, "suffix": [[0.0] * 5] * n}

    picked = replay_expected_oracle(seqs, linear_cost, STRATEGIES, ngram_looks_best)
    assert set(picked.choices) == {("ngram", 4)}
    fixed = replay_fixed(seqs, linear_cost, ("ngram", 4))
    assert (picked.tokens, picked.steps) == (fixed.tokens, fixed.steps)
    assert picked.seconds == pytest.approx(fixed.seconds)
    # Knowing only expectations costs something against knowing outcomes.
    assert picked.tokens_per_second < replay_oracle(seqs, linear_cost, STRATEGIES).tokens_per_second


def test_nothing_expected_means_plain_decoding() -> None:
    seqs = bursty_traces(2)
    nothing = replay_expected_oracle(
        seqs, linear_cost, STRATEGIES, lambda step: {"ngram": [[0.0]] * len(step.live)}
    )
    assert set(nothing.choices) == {(OFF, 0)}


def test_pooled_means_are_each_positions_mean_over_the_rows_answered() -> None:
    pooled = PooledMeans()
    answer = pooled.recording(lambda step: {"suffix": [[0.0, 0.5, 0.75], [0.0, 1.0], [0.0]]})
    step = Step(live=(), dynamic={})
    assert answer(step) == {"suffix": [[0.0, 0.5, 0.75], [0.0, 1.0], [0.0]]}  # passed through
    answer(step)
    # Position 1: rows 1 and 2 (0.5 and 1.0); position 2: row 1 alone (0.75 - 0.5).
    assert pooled.means() == {"suffix": pytest.approx((0.75, 0.25))}
    curves = PooledExpectation(
        lambda step: {"suffix": [[0.0, 0.0, 0.0], [0.0, 1.0]]}, pooled.means()
    )
    assert curves(step) == {"suffix": [pytest.approx((0.0, 0.75, 1.0)), pytest.approx((0.0, 0.75))]}


def two_halves() -> list[SequenceTrace]:
    """n-gram drafts match 4 tokens in each sequence's first half and nothing after; suffix
    drafts match 1 token everywhere."""
    return [
        SequenceTrace(f"h{i}", 1, 41, {"ngram": [4] * 20 + [0] * 20, "suffix": [1] * 40})
        for i in range(10)
    ]


def test_pooling_a_drafter_loses_its_step_to_step_knowledge() -> None:
    seqs = two_halves()
    pooled = PooledMeans()
    full = replay_expected_oracle(seqs, linear_cost, STRATEGIES, pooled.recording(realized_curves))
    greedy = replay_oracle(seqs, linear_cost, STRATEGIES, lookahead_batch=0)
    assert full.seconds == pytest.approx(greedy.seconds)  # recording changes nothing
    means = pooled.means()
    assert means["suffix"][:2] == pytest.approx((1.0, 0.0))
    # Knowing n-gram's acceptance step by step, the oracle drafts 4 n-gram tokens in the
    # first halves and 1 suffix token after. Pooled, n-gram looks half as good everywhere
    # and loses to suffix:1 throughout (linear_cost: 30 tokens / 0.06 s < 20 / 0.03 s).
    assert ("ngram", 4) in full.choices
    no_ngram = replay_expected_oracle(
        seqs, linear_cost, STRATEGIES, PooledExpectation(realized_curves, {"ngram": means["ngram"]})
    )
    assert set(no_ngram.choices) == {("suffix", 1)}
    assert no_ngram.tokens_per_second < full.tokens_per_second
    # Suffix drafts get the same at every step: pooling it changes nothing.
    no_suffix = replay_expected_oracle(
        seqs,
        linear_cost,
        STRATEGIES,
        PooledExpectation(realized_curves, {"suffix": means["suffix"]}),
    )
    assert no_suffix.choices == full.choices


@pytest.fixture(scope="module")
def probabilities(tiny_kit: Path) -> DraftProbabilities:
    return DraftProbabilities(tiny_kit / "policy", temperature=0.7)


def one_by_one(
    model: torch.nn.Module, context: list[int], draft: list[int], t: float
) -> list[float]:
    """The same expectation from one unpadded forward per draft token."""
    curve, run, total = [0.0], 1.0, 0.0
    for j, token in enumerate(draft):
        ids = torch.tensor([context + draft[:j]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        run *= float(torch.softmax(logits / t, -1)[token])
        total += run
        curve.append(total)
    return curve


def test_batched_probabilities_equal_one_forward_per_token(
    probabilities: DraftProbabilities,
) -> None:
    rng = random.Random(3)
    vocab = probabilities.model.config.vocab_size
    items = []
    for n in (3, 9, 17, 30):  # different lengths: the batch pads the shorter ones
        context = tuple(rng.randrange(3, vocab) for _ in range(n))
        draft = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, 5)))
        items.append((context, draft))
    items.append((items[0][0], ()))  # no draft: nothing expected
    curves = probabilities.expected(items)
    assert curves[-1] == (0.0,)
    for (context, draft), curve in zip(items[:-1], curves, strict=False):
        want = one_by_one(probabilities.model, list(context), list(draft), 0.7)
        assert curve == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert all(b >= a for a, b in itertools.pairwise(curve))  # grows with k
        assert curve[-1] <= len(draft)
    forwards = probabilities.forwards
    assert probabilities.expected(items[:2]) == curves[:2]  # cached: no new forward
    assert probabilities.forwards == forwards


def shadow_of(
    sequences: dict[str, list[int]], drafts: dict[str, dict[int, list[int]]]
) -> ShadowDrafts:
    """A shadow run whose sequences have a 2-token prompt and the given drafts ("ngram")."""
    shadow = ShadowDrafts()
    for key, tokens in sequences.items():
        arr = np.asarray(tokens, dtype=np.int64)
        for out in range(1, len(tokens) - 1):
            row = DraftRow(key, arr[: 2 + out], 2, "g", 4)
            shadow.record([row], {"ngram": [drafts[key].get(out, [])]})
        shadow.record([DraftRow(key, arr, 2, "g", 0)], {"ngram": [[]]})
    return shadow


def test_expected_drafts_reads_the_shadow_drafts_at_each_live_position(
    probabilities: DraftProbabilities,
) -> None:
    tokens = [5, 6, 7, 8, 9, 10, 11, 12]
    shadow = shadow_of({"a": tokens}, {"a": {2: [9, 4], 3: [4]}})
    (trace,) = shadow.traces()
    expected = ExpectedDrafts(shadow, None, ["ngram"], probabilities)
    at_2 = expected(Step([(trace, 2)], {}))["ngram"][0]
    at_4 = expected(Step([(trace, 4)], {}))["ngram"][0]
    assert at_2 == pytest.approx(one_by_one(probabilities.model, tokens[:4], [9, 4], 0.7))
    assert at_4 == (0.0,)  # no draft was made there
    # The calibration counts the drafts followed by enough real tokens, first token realized.
    check = calibration([shadow], ["ngram"], probabilities)["ngram"]
    assert check["drafts"] == 2
    assert check["realized"] == 0.5  # after 7, 8 comes 9: [9, 4] starts right; [4] does not


def _report(batches: int, steps_per_batch: int) -> dict[str, object]:
    return {
        "tokens_per_second": 900.0,
        "over_oracle": 0.95,
        "over_best_fixed": 1.08,
        "over_off": 1.6,
        "choices": {"draft_model:2": batches * steps_per_batch - 1, "off:0": 1},
        "iterations": [{"iteration": i, "tokens_per_second": 900.0} for i in range(batches)],
        "calibration": {},
    }


def test_the_printout_says_how_many_steps_a_ceiling_rests_on() -> None:
    # One batch of the tiny bench is ~13 steps, and its ceiling moved from 1.034x to 1.169x
    # the best fixed configuration between two runs: the printout must say so.
    one = summary(_report(1, 13))
    assert "(13 steps of 1 batch)" in one[0]
    assert any("selector-batches" in line for line in one)
    many = summary(_report(6, 13))
    assert "(78 steps of 6 batches)" in many[0]
    assert not any("selector-batches" in line for line in many)
