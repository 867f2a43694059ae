"""GenerationEngine on real vLLM (CPU): lossless speculation, log-probs, metrics follow choices.

Engines are expensive on 2 cores, so the module shares three: plain decoding (the reference),
the adaptive proposer with every per-step drafter, and vLLM's native draft model with Dynamic
SD. vLLM's native ngram starts last, twice, with a plain engine after it: engines started after
it once failed (``vllm_fixes`` bug 3). Our own ngram runs inside the adaptive proposer.
"""

from __future__ import annotations

import inspect
import itertools
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from family_models import family_model
from rlhfspec_api.generation import GenerationSpec
from rlhfspec_workers.generation.draft_strategy import (
    OFF,
    BatchSizeStrategy,
    DraftChoice,
    FixedStrategy,
    ScriptedStrategy,
)

# A plain import, never importorskip: a broken engine import must fail these tests, not skip.
from rlhfspec_workers.generation.engine import (
    GenerationEngine,
    PromptInput,
    SamplingConfig,
)
from rlhfspec_workers.spec_decode.draft_choice import BatchRange

pytestmark = pytest.mark.engine

VOCAB = 256
ENGINE_ARGS: dict[str, Any] = {
    # fp32 on every machine: these tests compare tokens and log-probs with plain decoding
    # exactly, which holds in fp32 only (in bf16, verifying k+1 tokens in one forward rounds
    # differently from one-token steps; tests/integration/test_real_model.py covers bf16).
    "dtype": "float32",
    "max_num_seqs": 256,
    "max_model_len": 192,
    "kv_cache_bytes": 96 << 20,
}


def _save_llama(path: Path, hidden: int, layers: int, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=256,
        # Wide init: peaked next-token distributions (entropy ~2.5 nats), so greedy has no
        # near-ties and sampled tokens fall into few enough bins for a chi-square test.
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_llama(tmp_path_factory.mktemp("target"), hidden=256, layers=4, seed=0)


def _spec(speculative: dict[str, Any]) -> GenerationSpec:
    return GenerationSpec.model_validate({"speculative": speculative})


@pytest.fixture(scope="module")
def ref_engine(target: Path) -> Iterator[Any]:
    engine = GenerationEngine(_spec({"mode": "off"}), target, **ENGINE_ARGS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def spec_engine(target: Path, ref_engine: Any) -> Iterator[Any]:
    # The draft model is the target itself (computed in fp32 by our forward): high acceptance,
    # so sampled tokens mostly come through the acceptance path the tests mean to exercise.
    speculative = {
        "mode": "adaptive",
        "maxDraftTokens": 8,
        "drafters": [
            {"method": "ngram", "promptLookupMin": 1, "promptLookupMax": 3},
            {"method": "suffix"},
            {"method": "draft_model", "model": {"path": "tiny://policy"}},
        ],
    }
    engine = GenerationEngine(_spec(speculative), target, draft_models={2: target}, **ENGINE_ARGS)
    yield engine
    engine.close()


def prompts(count: int, n: int = 1, *, lengths: Sequence[int] | None = None) -> list[Any]:
    out = []
    for i in range(count):
        body = [3 + (11 * i + 5 * j) % (VOCAB - 3) for j in range(4 + i % 5)]
        out.append(
            PromptInput(
                [1, *body], f"p{i}", n=n, max_tokens=lengths[i] if lengths is not None else None
            )
        )
    return out


GREEDY = SamplingConfig(temperature=0.0, max_tokens=24, ignore_eos=True)


def _scripted(call: int, batch_size: int) -> DraftChoice:
    # Cycles through every drafter, k = 0 on every third call, k growing as the batch shrinks.
    drafter = ("draft_model", "ngram", OFF, "suffix", "draft_model", OFF)[call % 6]
    return DraftChoice(drafter, 0 if call % 3 == 2 else (3 if batch_size > 4 else 8))


STRATEGIES = {
    "off": FixedStrategy(DraftChoice(OFF, 0)),
    "ngram-4": FixedStrategy(DraftChoice("ngram", 4)),
    "suffix-4": FixedStrategy(DraftChoice("suffix", 4)),
    "draft-2": FixedStrategy(DraftChoice("draft_model", 2)),
    "draft-8": FixedStrategy(DraftChoice("draft_model", 8)),
    "scripted": ScriptedStrategy(_scripted),
}
BATCHES = {"B1": (1, 1), "B12": (6, 2), "B40": (20, 2)}


@pytest.fixture(scope="module")
def greedy_reference(ref_engine: Any) -> dict[str, list[Any]]:
    return {
        name: ref_engine.generate_all(prompts(c, n), GREEDY) for name, (c, n) in BATCHES.items()
    }


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_greedy_outputs_identical_to_plain_decoding(
    spec_engine: Any, greedy_reference: dict[str, list[Any]], strategy: str
) -> None:
    spec_engine.set_strategy(STRATEGIES[strategy])
    drafted = 0
    for name, (count, n) in BATCHES.items():
        got = spec_engine.generate_all(prompts(count, n), GREEDY)
        ref = greedy_reference[name]
        assert [r.token_ids for r in got] == [r.token_ids for r in ref], name
        for a, b in zip(got, ref, strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-3
        drafted += sum(r.num_draft_tokens for r in got)
    steps = spec_engine.drain_steps()
    assert all(s.num_draft_tokens == s.proposer_draft_tokens for s in steps)
    assert (drafted > 0) == (strategy != "off")


def _schedule(batch_size: int) -> int:
    return 0 if batch_size >= 9 else 2 if batch_size >= 5 else 5 if batch_size >= 2 else 8


def test_vllm_metrics_follow_the_chosen_k_as_the_batch_shrinks(spec_engine: Any) -> None:
    table = [
        BatchRange(lo, hi, "draft_model", _schedule(lo)) for lo, hi in ((1, 1), (2, 4), (5, 8))
    ]
    spec_engine.set_strategy(BatchSizeStrategy(table))
    spec_engine.drain_steps()
    before = spec_engine.counters()
    # Samples finish one by one (B goes 12 -> 1); the last runs alone for 40 tokens, so k=8
    # is verified at B=1 even when the draft (the target itself) gets every token right.
    lengths = [6 + 5 * i for i in range(11)] + [100]
    results = spec_engine.generate_all(prompts(12, lengths=lengths), GREEDY)
    after = spec_engine.counters()
    steps: list[Any] = spec_engine.drain_steps()

    for prev, step in itertools.pairwise(steps):
        assert step.next_k == _schedule(step.batch_size)  # what was chosen, per batch size
        assert step.k == (prev.next_k if step.num_drafts else 0)  # is what vLLM verified
        assert step.num_draft_tokens == step.proposer_draft_tokens
        assert step.num_accepted_tokens == step.proposer_accepted_tokens
        if step.num_drafts:
            # vLLM's drafted-per-position: no draft verified is longer than k; most are
            # exactly k (rows near max_tokens get fewer: the proposer caps them so no draft
            # is wasted, see DraftRow.max_k).
            assert step.drafted_per_pos[0] == step.num_drafts
            assert not any(step.drafted_per_pos[step.k :])
            assert not any(step.accepted_per_pos[step.k :])
    full = sum(s.drafted_per_pos[s.k - 1] for s in steps if s.num_drafts)
    assert full >= 0.7 * sum(s.num_drafts for s in steps)
    assert {s.k for s in steps} >= {0, 2, 5, 8}

    assert_three_views_agree(before, after, steps, results)


def assert_three_views_agree(
    before: dict[str, Any], after: dict[str, Any], steps: Sequence[Any], results: Sequence[Any]
) -> None:
    """Three views of the same counts agree: the engine's Prometheus counters (deltas from
    ``before`` to ``after``), vLLM's per-step scheduler stats, and its per-request metrics."""
    delta = {name: after[name] for name in after}
    for name in after:
        if isinstance(after[name], list):
            delta[name] = [a - b for a, b in zip(after[name], before[name], strict=True)]
        else:
            delta[name] = after[name] - before[name]
    assert delta["vllm:spec_decode_num_drafts"] == sum(s.num_drafts for s in steps)
    assert delta["vllm:spec_decode_num_draft_tokens"] == sum(s.num_draft_tokens for s in steps)
    accepted = sum(s.num_accepted_tokens for s in steps)
    assert delta["vllm:spec_decode_num_accepted_tokens"] == accepted
    per_pos = [sum(s.accepted_per_pos[i] for s in steps if s.accepted_per_pos) for i in range(8)]
    assert delta["vllm:spec_decode_num_accepted_tokens_per_pos"] == per_pos
    assert sum(r.num_draft_tokens for r in results) == sum(s.num_draft_tokens for s in steps)
    assert sum(r.num_accepted_tokens for r in results) == accepted


def _chi_square_p(a: Counter[int], b: Counter[int]) -> float:
    """Two-sample chi-square test of equal distributions; rare tokens pooled into one bin."""
    na, nb = sum(a.values()), sum(b.values())
    bins: list[tuple[int, int]] = []
    rare = [0, 0]
    for token in set(a) | set(b):
        if a[token] + b[token] >= 10:
            bins.append((a[token], b[token]))
        else:
            rare[0] += a[token]
            rare[1] += b[token]
    bins.append((rare[0], rare[1]))
    stat = 0.0
    for ca, cb in bins:
        total = ca + cb
        for count, n in ((ca, na), (cb, nb)):
            expected = total * n / (na + nb)
            if expected > 0:
                stat += (count - expected) ** 2 / expected
    dof = len(bins) - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))


def _sampled_reference(ref_engine: Any, cache: dict[str, list[Any]]) -> list[Any]:
    if "sampled" not in cache:
        cache["sampled"] = ref_engine.generate_all(prompts(1, n=256), SAMPLED)
    return cache["sampled"]


# Temperature 0.7 sharpens the target, so greedy drafts are accepted often (any temperature is
# lossless; this one makes the test exercise acceptance, not just the recovery path).
SAMPLED = SamplingConfig(temperature=0.7, max_tokens=6, seed=1234, ignore_eos=True)
_REF: dict[str, list[Any]] = {}


@pytest.mark.parametrize("drafter", ["draft_model", "suffix"])
def test_sampling_distribution_equals_plain_decoding(
    spec_engine: Any, ref_engine: Any, drafter: str
) -> None:
    """256 samples of one prompt: per position, the token distribution with speculation is
    not distinguishable from plain decoding (chi-square, alpha 0.001), while most tokens at
    positions >= 1 were drafts that vLLM accepted."""
    reference = _sampled_reference(ref_engine, _REF)
    spec_engine.set_strategy(FixedStrategy(DraftChoice(drafter, 4)))
    spec_engine.drain_steps()
    got = spec_engine.generate_all(prompts(1, n=256), SAMPLED)
    steps = spec_engine.drain_steps()
    accepted = sum(s.num_accepted_tokens for s in steps)
    # The acceptance path carried a good share (~20%) of the tokens at positions >= 1.
    assert accepted > 0.12 * 256 * (SAMPLED.max_tokens - 1), accepted
    for pos in range(1, SAMPLED.max_tokens):
        p = _chi_square_p(
            Counter(r.token_ids[pos] for r in got), Counter(r.token_ids[pos] for r in reference)
        )
        assert p > 1e-3, (drafter, pos, p)


def test_logprobs_are_the_targets(spec_engine: Any, ref_engine: Any) -> None:
    """Sampled with speculation, the returned log-probs equal the target's log-probs of the
    same tokens recomputed without speculation (vLLM prompt_logprobs on the reference)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    spec_engine.set_strategy(ScriptedStrategy(_scripted))
    got = spec_engine.generate_all(prompts(4, n=3), SamplingConfig(1.0, 1.0, 16, seed=7))
    engine = ref_engine.engine
    for i, r in enumerate(got):
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        engine.add_request(
            f"lp{i}", TokensPrompt(prompt_token_ids=r.prompt_token_ids + r.token_ids), params
        )
    recomputed: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                recomputed[out.request_id] = out.prompt_logprobs
    worst = 0.0
    for i, r in enumerate(got):
        plp = recomputed[f"lp{i}"][len(r.prompt_token_ids) :]
        ref = [d[t].logprob for d, t in zip(plp, r.token_ids, strict=True)]
        worst = max(worst, *(abs(a - b) for a, b in zip(r.logprobs, ref, strict=True)))
    assert worst < 0.05, worst  # bf16 target; batch composition differs between the runs


def test_samples_stream_out_as_they_finish(spec_engine: Any) -> None:
    spec_engine.set_strategy(FixedStrategy(DraftChoice("draft_model", 3)))
    spec_engine.drain_steps()
    lengths = [40, 3, 40, 5]
    seen: list[tuple[str, int]] = []
    for result in spec_engine.generate(prompts(4, lengths=lengths), GREEDY):
        seen.append((result.prompt_id, len(spec_engine.steps)))
    total = len(spec_engine.drain_steps())
    assert [p for p, _ in seen[:2]] in (["p1", "p3"], ["p3", "p1"])
    assert max(step for p, step in seen if p in ("p1", "p3")) < total / 2


def test_stopping_early_aborts_the_rest(spec_engine: Any) -> None:
    gen = spec_engine.generate(prompts(3, lengths=[2, 50, 50]), GREEDY)
    first = next(gen)
    gen.close()
    assert first.prompt_id == "p0"
    assert not spec_engine.engine.has_unfinished_requests()


def test_native_dynamic_sd_baseline_follows_vllm_schedule(
    target: Path, greedy_reference: dict[str, list[Any]], spec_engine: Any
) -> None:
    """vLLM's own draft model with Dynamic SD (k per scheduled batch size): lossless, and the
    verified k follows vLLM's schedule. Started last: it is the third engine."""
    schedule = [(1, 3, 6), (4, 8, 2), (9, 256, 1)]
    speculative = {
        "mode": "fixed",
        "maxDraftTokens": 6,
        "drafters": [{"method": "draft_model", "model": {"path": "tiny://policy"}}],
    }
    engine = GenerationEngine(
        _spec(speculative),
        target,
        draft_models={0: target},
        native=True,
        per_batch_size=schedule,
        **ENGINE_ARGS,
    )
    try:
        got = engine.generate_all(prompts(20, 2), GREEDY)
        assert [r.token_ids for r in got] == [r.token_ids for r in greedy_reference["B40"]]
        lengths = [4 + 3 * i for i in range(10)]
        engine.drain_steps()
        engine.generate_all(prompts(10, lengths=lengths), GREEDY)
        steps: list[Any] = engine.drain_steps()
        for prev, step in itertools.pairwise(steps):
            if step.num_drafts:
                want = next(k for lo, hi, k in schedule if lo <= prev.batch_size <= hi)
                assert step.num_draft_tokens == step.num_drafts * want, (prev, step)
        assert {s.k for s in steps if s.num_drafts} >= {1, 2, 6}
    finally:
        engine.close()


def test_a_native_schedule_rewrites_vllm_s_k_per_batch_size_as_it_runs(
    target: Path, ref_engine: Any
) -> None:
    """Our selector's k carried by vLLM's native path (``native_schedule``): the Dynamic SD
    lookup the engine started with (k = 4 everywhere) is replaced by the schedule's at once
    and rewritten after every step; vLLM drafts what the lookup says and stays lossless."""
    from rlhfspec_workers.generation.adaptive import adaptive_strategy_for
    from rlhfspec_workers.generation.native_schedule import NativeSchedule
    from rlhfspec_workers.spec_decode.cost_model import CostModel
    from rlhfspec_workers.spec_decode.cost_records import CostSample, CostTableKey, DrafterCost

    speculative = {
        "mode": "fixed",
        "maxDraftTokens": 6,
        "drafters": [{"method": "draft_model", "model": {"path": "tiny://policy"}}],
    }
    spec = _spec(speculative)
    engine = GenerationEngine(
        spec, target, draft_models={0: target}, native=True, per_batch_size=[(1, 256, 4)],
        **ENGINE_ARGS,
    )  # fmt: skip
    # Verification nearly free in tokens below 8 rows, compute-bound above: deep drafts pay
    # for small batches, none for large ones (the draft is the target itself: it is always
    # accepted, greedy).
    cost = CostModel(
        CostTableKey("t", "test"),
        [CostSample(b, t, 0.01 + (1e-4 if b < 8 else 4e-3) * b * t)
         for b in (1, 2, 4, 8, 16, 32, 64) for t in range(1, 8)],
        [DrafterCost("draft_model", 0.0005, ((1, 1e-4), (64, 1e-3)))],
    )  # fmt: skip
    strategy = adaptive_strategy_for(["draft_model"], 6, spec, cost)
    schedule = NativeSchedule(strategy, "draft_model")
    try:
        engine.set_native_schedule(schedule)
        lookup = engine.dynamic_sd_lookup()
        assert lookup[1] == schedule.k_at(1) > 0 and lookup[64] == schedule.k_at(64) == 0
        written = schedule.rewrites
        # 16 samples of staggered lengths: the batch drains from 16 to 1.
        batch = prompts(8, 2, lengths=[4 + 4 * i for i in range(8)])
        want = ref_engine.generate_all(batch, GREEDY)
        engine.drain_steps()
        got = engine.generate_all(batch, GREEDY)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        steps = engine.drain_steps()
        drafted = [s for s in steps if s.num_drafts]
        assert drafted and not all(s.num_drafts for s in steps)  # large batches: plain
        assert {s.k for s in drafted} != {4}  # not the lookup the engine was built with
        assert all(s.num_accepted_tokens > 0 for s in drafted)  # the draft is the target
        assert schedule.rewrites > written  # acceptance of 1.0 moved entries as it ran
        # Each record says what vLLM drafts next (the worker's heartbeat reports it).
        nexts = {(s.next_drafter, s.next_k) for s in steps}
        assert any(d == "draft_model" and k > 0 for d, k in nexts) and ("off", 0) in nexts
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="native=True and per_batch_size"):
        ref_engine.set_native_schedule(schedule)  # not a native engine


def test_native_execution_calibrates_vllm_s_steps_and_sets_k_losslessly(
    target: Path, ref_engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``selector.execution: native`` as a worker sets it up (``native_setup``): calibration
    times whole native steps at (B, k) through vLLM's lookup, the table prices the drafter
    free and is cached under its own key (a second start measures nothing), the schedule is
    attached, and generation stays lossless."""
    from rlhfspec_workers.generation import native_setup
    from rlhfspec_workers.generation.cost_cache import cached_cost_model, cost_table_key
    from rlhfspec_workers.generation.native_setup import calibrate_native, native_strategy

    spec = _spec(
        {
            "mode": "adaptive",
            "maxDraftTokens": 4,
            "selector": {"execution": "native"},
            "drafters": [{"method": "draft_model", "model": {"path": "tiny://policy"}}],
        }
    )
    assert spec.speculative.native_execution
    engine = GenerationEngine(
        spec, target, draft_models={0: target}, native=True, per_batch_size=[(1, 256, 4)],
        **ENGINE_ARGS,
    )  # fmt: skip
    try:
        before = list(engine.dynamic_sd_lookup())
        samples = calibrate_native(engine, max_batch=4, batches=(1, 4), ks=(0, 2, 4))
        assert {(s.batch_size, s.tokens_per_seq) for s in samples} == {
            (b, k + 1) for b in (1, 4) for k in (0, 2, 4)
        }
        assert all(s.seconds > 0 for s in samples)
        assert engine.dynamic_sd_lookup() == before  # restored
        strategy = native_strategy(
            engine, spec, max_batch=4, budget_seconds=60.0, cache_dir=tmp_path
        )
        assert strategy.selector.cost_model.draft_seconds("draft_model", 4, 2) == 0.0
        assert engine.native_schedule is not None
        key = native_setup.native_table_key(engine, "draft_model")
        assert key != cost_table_key(engine) and key.model_id.endswith(":native-draft_model")
        stored = cached_cost_model(engine, tmp_path, key)
        assert stored is not None and {s.batch_size for s in stored.samples} == {1, 4}
        assert cached_cost_model(engine, tmp_path) is None  # not the proposer path's file

        def no_probes(*args: Any, **kwargs: Any) -> list[Any]:
            raise AssertionError("a cached native table was measured again")

        monkeypatch.setattr(native_setup, "calibrate_native", no_probes)
        again = native_strategy(engine, spec, max_batch=4, cache_dir=tmp_path, write_back=False)
        assert again.selector.cost_model.samples == stored.samples
        assert again.learner is not None and again.learner._save is None
        batch = prompts(4, 2, lengths=[6, 10, 14, 18])
        got = engine.generate_all(batch, GREEDY)
        want = ref_engine.generate_all(batch, GREEDY)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert any(s.num_drafts for s in engine.drain_steps())
        with pytest.raises(ValueError, match=r"selector\.execution: native"):
            native_strategy(ref_engine, spec, max_batch=4)  # not a native engine
    finally:
        engine.close()


def test_calibration_feeds_the_cost_model(spec_engine: Any) -> None:
    from rlhfspec_workers.generation.calibrate import measure_drafter, measure_verify
    from rlhfspec_workers.spec_decode.cost_model import CostModel

    plan = [(1, 1), (1, 5), (8, 1), (8, 5)]
    samples = measure_verify(spec_engine, plan, steps=5, repeats=1)
    assert sorted((s.batch_size, s.tokens_per_seq) for s in samples) == sorted(plan)
    assert all(s.seconds > 0 for s in samples)
    draft = measure_drafter(spec_engine, "draft_model", [1, 8], k=3, steps=5)
    assert [b for b, _ in draft.per_token] == [1, 8]
    model = CostModel.fit(samples, [draft])
    assert model.step_seconds("draft_model", 4, 3) > model.verify_seconds(4, 0) > 0


def test_an_engine_starts_after_vllm_s_native_ngram_has_drafted(
    target: Path, greedy_reference: dict[str, list[Any]]
) -> None:
    """``vllm_fixes`` bug 3: once vLLM's native n-gram proposer has drafted (numba compiled
    through llvmlite), vLLM's kernel rebind scan, run by every engine's worker as it starts,
    crashed on llvmlite's module global, so no engine could start after it in the process
    (the SmolLM2 generation bench died creating its third native n-gram engine). Started last
    in this module; later test modules start engines after it too."""
    from vllm.triton_utils import dispatcher

    from rlhfspec_workers import vllm_fixes

    speculative = {
        "mode": "fixed",
        "numDraftTokens": 2,
        "drafters": [{"method": "ngram", "promptLookupMin": 1, "promptLookupMax": 3}],
    }
    batch = prompts(20, 2)
    for _ in range(2):  # the second native engine starts after the first one drafted
        engine = GenerationEngine(_spec(speculative), target, native=True, **ENGINE_ARGS)
        try:
            got = engine.generate_all(batch, GREEDY)
            assert any(s.num_drafts for s in engine.drain_steps())
        finally:
            engine.close()
        assert [r.token_ids for r in got] == [r.token_ids for r in greedy_reference["B40"]]
    assert "_rlhfspec_rebind_probe" not in sys.modules
    # vLLM's own scan still crashes on such a global; the guarded one, installed, does not.
    assert vllm_fixes.rebind_is_broken(inspect.unwrap(dispatcher._rebind_kernels))
    assert not vllm_fixes.rebind_is_broken()
    plain = GenerationEngine(_spec({"mode": "off"}), target, **ENGINE_ARGS)
    try:
        got = plain.generate_all(batch, GREEDY)
    finally:
        plain.close()
    assert [r.token_ids for r in got] == [r.token_ids for r in greedy_reference["B40"]]


def test_a_qwen_draft_drafts_in_the_engine_and_stays_lossless(
    target: Path, greedy_reference: dict[str, list[Any]], tmp_path: Path
) -> None:
    """A draft of another family member than the Llama target (Qwen3: query/key norms) passes
    the engine's checks, drafts every step through the proposer's own forward, and the
    outputs stay the target's, token for token."""
    draft = tmp_path / "draft"
    family_model("Qwen3Config", vocab_size=VOCAB).save_pretrained(draft)
    speculative = {
        "mode": "fixed",
        "maxDraftTokens": 4,
        "drafters": [{"method": "draft_model", "model": {"path": "tiny://draft"}}],
    }
    engine = GenerationEngine(_spec(speculative), target, draft_models={0: draft}, **ENGINE_ARGS)
    try:
        engine.set_strategy(FixedStrategy(DraftChoice("draft_model", 3)))
        count, n = BATCHES["B12"]
        got = engine.generate_all(prompts(count, n), GREEDY)
        assert [r.token_ids for r in got] == [r.token_ids for r in greedy_reference["B12"]]
        assert sum(r.num_draft_tokens for r in got) > 0
    finally:
        engine.close()


def _registry_draft_tokens(engine: Any) -> int:
    """What vLLM's own ``get_metrics()`` (the process-wide registry) says ``engine`` drafted."""
    names = {"vllm:spec_decode_num_draft_tokens"}
    return sum(int(m.value) for m in engine.engine.get_metrics() if m.name in names)


def test_an_engine_reads_its_own_counters_after_another_engine_started(
    target: Path, spec_engine: Any
) -> None:
    """A newer engine in the process takes over vLLM's process-wide metrics registry, so
    ``get_metrics()`` on the older one stops moving; ``counters()`` reads the older engine's
    own counters, which still agree with its steps exactly."""
    newer = GenerationEngine(_spec({"mode": "off"}), target, **ENGINE_ARGS)
    try:
        spec_engine.set_strategy(FixedStrategy(DraftChoice("draft_model", 3)))
        spec_engine.drain_steps()
        before, registry_before = spec_engine.counters(), _registry_draft_tokens(spec_engine)
        results = spec_engine.generate_all(prompts(8), GREEDY)
        after, registry_after = spec_engine.counters(), _registry_draft_tokens(spec_engine)
        steps = spec_engine.drain_steps()
    finally:
        newer.close()
    assert sum(s.num_draft_tokens for s in steps) > 0
    assert_three_views_agree(before, after, steps, results)
    # The hazard this guards against: the registry's read of the older engine did not move.
    assert registry_after == registry_before
