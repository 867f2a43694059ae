"""Adaptive mode on real vLLM (CPU) with the tiny kit: calibration cache, the selector's k as
vLLM verified it while the batch drains, and losslessness (greedy and sampled).

Two engines for the module: plain decoding (the reference) and the adaptive proposer with
suffix, ngram and the kit's draft model. float32: this CPU has no native bf16 (AVX2 only), and
emulated bf16 puts every step deep in a compute-bound regime (see benchmarks.generation).
"""

from __future__ import annotations

import itertools
import logging
import statistics
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhfspec_api.generation import GenerationSpec
from rlhfspec_workers.generation.adaptive import (
    AdaptiveStrategy,
    build_adaptive_strategy,
    make_strategy,
)
from rlhfspec_workers.generation.draft_strategy import (
    NO_DRAFT,
    DraftChoice,
    FixedStrategy,
    ScriptedStrategy,
)

# A plain import, never importorskip: a broken engine import must fail these tests, not skip.
from rlhfspec_workers.generation.engine import GenerationEngine
from rlhfspec_workers.generation.records import PromptInput, SamplingConfig
from rlhfspec_workers.spec_decode.cost_records import DrafterCost
from rlhfspec_workers.spec_decode.synthetic_cost import Roofline, synthetic_cost_model

pytestmark = pytest.mark.engine

ENGINE_ARGS: dict[str, Any] = {
    "max_num_seqs": 128,
    "max_model_len": 128,
    "kv_cache_bytes": 256 << 20,
    "dtype": "float32",
}
SPECULATIVE: dict[str, Any] = {
    "mode": "adaptive",
    "maxDraftTokens": 8,
    "drafters": [
        {"method": "suffix"},
        {"method": "ngram", "promptLookupMin": 1, "promptLookupMax": 3},
        {"method": "draft_model", "model": {"path": "tiny://draft"}},
        {"method": "suffix_tree"},
    ],
}


def _spec(speculative: dict[str, Any]) -> GenerationSpec:
    return GenerationSpec.model_validate({"speculative": speculative})


@pytest.fixture(scope="module")
def off_engine(tiny_kit: Path) -> Iterator[Any]:
    engine = GenerationEngine(_spec({"mode": "off"}), tiny_kit / "policy", **ENGINE_ARGS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def adaptive_engine(tiny_kit: Path, off_engine: Any) -> Iterator[Any]:
    engine = GenerationEngine(
        _spec(SPECULATIVE),
        tiny_kit / "policy",
        draft_models={2: tiny_kit / "draft"},
        **ENGINE_ARGS,
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def calibration(
    adaptive_engine: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[AdaptiveStrategy, Path]:
    cache = tmp_path_factory.mktemp("calibration")
    # A budget no machine runs out of: the table is complete, so the test below is about the
    # cache, not about how much of the grid a loaded machine measures in a worker's 45 s (a
    # partial table is continued by the next start, a different path).
    strategy = make_strategy(
        adaptive_engine, _spec(SPECULATIVE), cache_dir=cache, budget_seconds=3600.0
    )
    assert isinstance(strategy, AdaptiveStrategy)
    return strategy, cache


def test_make_strategy_calibrates_once_then_reuses_the_cache(
    adaptive_engine: Any, calibration: tuple[AdaptiveStrategy, Path], caplog: Any
) -> None:
    strategy, cache = calibration
    files = list(cache.glob("*.json"))
    assert len(files) == 1
    costs = strategy.selector.cost_model
    assert set(costs.drafters) == {"suffix", "ngram", "draft_model", "suffix_tree"}
    # Measured on this engine: verifying more tokens per sequence costs more at a large batch.
    assert costs.verify_seconds(128, 8) > costs.verify_seconds(128, 0) > 0
    with caplog.at_level(logging.INFO, logger="rlhfspec_workers.generation.cost_table"):
        again = make_strategy(adaptive_engine, _spec(SPECULATIVE), cache_dir=cache)
    assert "from cache" in caplog.text
    assert isinstance(again, AdaptiveStrategy)
    assert again.selector.cost_model.to_json() == costs.to_json()
    assert again.selector.margin == 0.04 and again.half_life_steps == 64
    # The other modes need no calibration.
    assert make_strategy(adaptive_engine, _spec({"mode": "off"})) == FixedStrategy(NO_DRAFT)
    fixed = _spec({"mode": "fixed", "numDraftTokens": 3, "drafters": [{"method": "ngram"}]})
    assert make_strategy(adaptive_engine, fixed) == FixedStrategy(DraftChoice("ngram", 3))


def _long_tailed(tiny_kit: Path) -> list[PromptInput]:
    """32 prompts from the shortest to the longest answer, 4 samples each, each budget its
    answer: the batch drains from 128 to the 4 samples of the longest prompt."""
    from rlhfspec_workers.benchmarks.workload import Settings, load_prompts

    return load_prompts(tiny_kit, Settings(prompts=32, samples=4, slack=0))


GREEDY = SamplingConfig(temperature=0.0, max_tokens=64)
# GPU-like step costs: flat until 50 tokens per step, then linear (compute-bound). On this CPU
# the tiny target is too small for drafting to pay at any batch (see benchmarks.generation),
# so with its calibrated table the selector rightly never drafts; this table makes the batch
# dependence visible while everything else (estimators, selector, proposer) is the real path.
GPU_LIKE = synthetic_cost_model(
    Roofline(memory_floor_seconds=0.010, per_token_seconds=0.0002),
    drafters=[DrafterCost(d, 0.0003) for d in ("suffix", "ngram", "draft_model", "suffix_tree")],
    max_batch=128,
    max_k=8,
)


def _verified_k(step: Any) -> int:
    """The longest draft vLLM verified in a step, from vLLM's per-position draft counter."""
    return sum(1 for count in step.drafted_per_pos if count > 0)


def _run_checked(engine: Any, prompts: list[PromptInput]) -> tuple[list[Any], dict[int, list[int]]]:
    """Generate; check every step's verified drafts against the previous step's choice; return
    the samples and the k vLLM verified at each batch size."""
    engine.drain_steps()
    got = engine.generate_all(prompts, GREEDY)
    steps = engine.drain_steps()
    verified_at: dict[int, list[int]] = {}
    for prev, step in itertools.pairwise(steps):
        # vLLM verified what the selector chose at the previous step (rows near their budget
        # may get shorter drafts, never longer ones), and counted what the proposer proposed.
        assert step.k == (prev.next_k if step.num_drafts else 0)
        assert _verified_k(step) <= prev.next_k
        assert step.num_draft_tokens == step.proposer_draft_tokens
        assert step.num_accepted_tokens == step.proposer_accepted_tokens
        if step.num_drafts:
            assert step.drafted_per_pos[0] == step.num_drafts
        # The selector's own expectation of its drafts travels with the step that made them.
        if prev.next_k > 0:
            assert 0.0 <= prev.next_expected_accepted <= prev.next_k * prev.batch_size
        else:
            assert prev.next_expected_accepted == -1.0
        verified_at.setdefault(prev.batch_size, []).append(_verified_k(step))
    return got, verified_at


def test_verified_k_follows_the_selector_as_the_batch_shrinks(
    tiny_kit: Path, adaptive_engine: Any, off_engine: Any
) -> None:
    prompts = _long_tailed(tiny_kit)
    reference = off_engine.generate_all(prompts, GREEDY)
    adaptive_engine.set_strategy(
        build_adaptive_strategy(adaptive_engine, _spec(SPECULATIVE), GPU_LIKE)
    )
    for _ in range(2):  # the first iteration teaches the estimators; the second is checked
        got, verified_at = _run_checked(adaptive_engine, prompts)
        # Lossless: identical to plain decoding, token for token.
        assert [r.token_ids for r in got] == [r.token_ids for r in reference]
    large = [k for b, ks in verified_at.items() if b >= 64 for k in ks]
    # Drafting drains the tail fast: the last 20 samples can finish in one step of k = 8.
    small = [k for b, ks in verified_at.items() if b <= 32 for k in ks]
    assert large and small, sorted((b, ks) for b, ks in verified_at.items())
    assert statistics.median(small) > statistics.median(large), verified_at


def test_calibrated_adaptive_mode_is_lossless_and_applied(
    tiny_kit: Path,
    adaptive_engine: Any,
    off_engine: Any,
    calibration: tuple[AdaptiveStrategy, Path],
) -> None:
    """The calibrated strategy is applied step by step (vLLM verified what it chose) and is
    lossless. Whether this machine's calibrated table drafts at all depends on the CPU (on a
    small target, verification here is rarely cheap enough), so losslessness *with drafting* is
    proven on the same engine and prompts by a script that cycles every drafter and k: each
    drafter must have drafted and had tokens accepted."""
    strategy, _ = calibration
    adaptive_engine.set_strategy(strategy)
    prompts = _long_tailed(tiny_kit)
    got, _ = _run_checked(adaptive_engine, prompts)
    reference = off_engine.generate_all(prompts, GREEDY)
    assert [r.token_ids for r in got] == [r.token_ids for r in reference]

    drafters = [d["method"] for d in SPECULATIVE["drafters"]]
    ks = range(1, SPECULATIVE["maxDraftTokens"] + 1)
    cycle = [DraftChoice(d, k) for k in ks for d in drafters]  # every drafter within 3 steps
    adaptive_engine.set_strategy(ScriptedStrategy(lambda call, batch: cycle[call % len(cycle)]))
    adaptive_engine.drain_steps()
    got = adaptive_engine.generate_all(prompts, GREEDY)
    steps = adaptive_engine.drain_steps()
    assert [r.token_ids for r in got] == [r.token_ids for r in reference]
    drafted, accepted = Counter[str](), Counter[str]()
    for step in steps:
        drafted[step.drafter] += step.num_draft_tokens
        accepted[step.drafter] += step.num_accepted_tokens
    for d in drafters:
        assert drafted[d] > 0 and accepted[d] > 0, (d, drafted, accepted)
    assert all(s.next_expected_accepted == -1.0 for s in steps)  # a script predicts nothing


def _chi_square_p(a: Counter[int], b: Counter[int]) -> float:
    """Two-sample chi-square test of equal distributions; rare tokens pooled into one bin."""
    na, nb = sum(a.values()), sum(b.values())
    bins, rare = [], [0, 0]
    for token in set(a) | set(b):
        if a[token] + b[token] >= 10:
            bins.append((a[token], b[token]))
        else:
            rare[0] += a[token]
            rare[1] += b[token]
    bins.append((rare[0], rare[1]))
    stat = 0.0
    for ca, cb in bins:
        for count, n in ((ca, na), (cb, nb)):
            expected = (ca + cb) * n / (na + nb)
            if expected > 0:
                stat += (count - expected) ** 2 / expected
    dof = len(bins) - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))


def test_sampling_in_adaptive_mode_matches_plain_decoding(
    tiny_kit: Path, adaptive_engine: Any, off_engine: Any
) -> None:
    """One prompt, 32 samples per call in four budgets (the batch drains 32 -> 8), eight calls,
    temperature 1: per position, the token distribution with the selector switching drafter
    and k as the batch shrinks is not distinguishable from plain decoding (chi-square, alpha
    0.001)."""
    from rlhfspec_workers.tinymodels.task import read_dataset_jsonl

    prompt = next(e.prompt for e in read_dataset_jsonl(tiny_kit / "dataset" / "eval.jsonl"))
    prompts = [
        PromptInput(prompt, f"s{i}", n=8, group_id="same", max_tokens=2 + 2 * i) for i in range(4)
    ]
    sampling = SamplingConfig(temperature=1.0, max_tokens=8)
    # Flat until 100 tokens per step: k = 2 pays at batch 32, k = 8 at batch 8.
    costs = synthetic_cost_model(
        Roofline(memory_floor_seconds=0.020, per_token_seconds=0.0002),
        drafters=[
            DrafterCost(d, 0.0002) for d in ("suffix", "ngram", "draft_model", "suffix_tree")
        ],
        max_batch=128,
        max_k=8,
    )
    strategy = build_adaptive_strategy(adaptive_engine, _spec(SPECULATIVE), costs)
    adaptive_engine.set_strategy(strategy)
    adaptive_engine.drain_steps()
    got = [r for _ in range(8) for r in adaptive_engine.generate_all(prompts, sampling)]
    steps = adaptive_engine.drain_steps()
    ref = [r for _ in range(8) for r in off_engine.generate_all(prompts, sampling)]
    assert {s.k for s in steps if s.num_drafts} - {0}, "the selector never drafted"
    assert len({s.k for s in steps if s.num_drafts}) >= 2, "k never changed"
    assert sum(s.num_accepted_tokens for s in steps) > 0.1 * sum(len(r.token_ids) for r in got)
    for pos in range(1, 8):
        a = Counter(r.token_ids[pos] for r in got if len(r.token_ids) > pos)
        b = Counter(r.token_ids[pos] for r in ref if len(r.token_ids) > pos)
        p = _chi_square_p(a, b)
        assert p > 1e-3, (pos, p, a.most_common(4), b.most_common(4))
