"""A real pretrained model (SmolLM2-135M-Instruct from the zoo) through the project's engine.

What lossless means per dtype (README, "Your own model"):

* fp32: greedy speculative decoding is bitwise identical to plain decoding, for every
  model-free drafter at fixed k and in adaptive mode, on 12 chat prompts of 99-130 tokens
  with 200-token responses.
* bf16: verifying k+1 tokens in one forward rounds differently from one-token steps, so two
  greedy runs may part at a near-tie. Asserted: the runs are identical up to their first
  divergence, and at a divergence the plain run's top-2 log-probs were within
  ``NEAR_TIE_NATS``; sampling keeps the policy's distribution (chi-square, two samples).

Engines are built once per module (about 5 s each); every test picks its strategy.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from rlhfspec_api.generation import GenerationSpec
from rlhfspec_workers.generation.adaptive import build_adaptive_strategy
from rlhfspec_workers.generation.cost_table import uncalibrated_cost_model
from rlhfspec_workers.generation.draft_strategy import DraftChoice, FixedStrategy
from rlhfspec_workers.generation.engine import GenerationEngine
from rlhfspec_workers.generation.records import PromptInput, SampleResult, SamplingConfig

pytestmark = pytest.mark.engine

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "chat_prompts.jsonl"
ENGINE_ARGS: dict[str, Any] = {
    "max_num_seqs": 256,
    "max_model_len": 512,
    "kv_cache_bytes": 384 << 20,
    "chat_template": "on",
    # 32-token KV blocks (the CPU minimum; vLLM-CPU's default is 128): 256 short samples fit.
    "engine_kwargs": {"block_size": 32},
}
SPECULATIVE = {
    "mode": "adaptive",
    "maxDraftTokens": 8,
    "drafters": [{"method": "suffix"}, {"method": "ngram"}, {"method": "suffix_tree"}],
}
RESPONSE_TOKENS = 200
NEAR_TIE_NATS = 0.35
"""Largest top-2 log-prob gap at which two bf16 greedy runs may part. Measured on an AMX
machine: where runs parted, their log-probs of the chosen tokens differed by 0.001-0.155
nats; a flip needs the two candidates within the error of both runs (2 x 0.155 = 0.31)."""
BF16_LOGPROB_NATS = 0.2
"""Largest difference of the same token's log-prob in two bf16 runs before they part
(0.155 measured; bf16 keeps 8 mantissa bits, about 0.4% of logits of magnitude ~30)."""
FP32_LOGPROB_NATS = 1e-3
CHI2_CRITICAL = {8: 23.6, 4: 16.4}
"""Chi-square critical values by degrees of freedom at 0.25% per position: 1% over the four
positions tested (Bonferroni), so an unbiased sampler fails a test 1 time in 100 at most; the
bias vLLM-CPU once had (P(draft token) 0.19 -> 0.74) scores in the hundreds."""


def chat_prompts(tag: str, count: int | None = None, *, n: int = 1) -> list[PromptInput]:
    """The 12 chat prompts, ids prefixed by ``tag``; every run shares one group per prompt, as
    an RL job's iterations do, so the suffix drafter drafts from earlier answers to it."""
    rows = [json.loads(line) for line in PROMPTS.open()]
    return [
        PromptInput(r["prompt"], f"{tag}/{r['id']}", n=n, group_id=f"chat/{r['id']}")
        for r in rows[:count]
    ]


def _spec(speculative: dict[str, Any]) -> GenerationSpec:
    return GenerationSpec.model_validate({"speculative": speculative})


def _engines(model: Path, dtype: str, prime: int | None) -> Iterator[tuple[Any, Any]]:
    off = GenerationEngine(_spec({"mode": "off"}), model, dtype=dtype, **ENGINE_ARGS)
    spec = GenerationEngine(_spec(SPECULATIVE), model, dtype=dtype, **ENGINE_ARGS)
    # A previous "iteration": two sampled answers per prompt become the suffix drafter's
    # history (alone, a greedy sample has no sibling or earlier rollout to draft from).
    spec.set_strategy(FixedStrategy(DraftChoice("off", 0)))
    primer = SamplingConfig(temperature=1.0, max_tokens=48, seed=0)
    spec.generate_all(chat_prompts("prime", prime, n=2), primer)
    spec.new_iteration()
    yield off, spec
    spec.close()
    off.close()


@pytest.fixture(scope="module")
def fp32(smollm2_dir: Path) -> Iterator[tuple[Any, Any]]:
    yield from _engines(smollm2_dir, "float32", None)


GREEDY = SamplingConfig(temperature=0.0, max_tokens=RESPONSE_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def fp32_reference(fp32: tuple[Any, Any]) -> list[SampleResult]:
    off, _ = fp32
    results: list[SampleResult] = off.generate_all(chat_prompts("off"), GREEDY)
    return results


def test_chat_template_is_the_tokenizers_own(fp32: tuple[Any, Any], smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    off, _ = fp32
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = json.loads(PROMPTS.open().readline())["prompt"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    want = tokenizer.encode(rendered, add_special_tokens=False)
    assert off.tokenize(text) == want
    [result] = off.generate_all(
        [PromptInput(text, "template")], SamplingConfig(temperature=0.0, max_tokens=128)
    )
    assert result.prompt_token_ids == want
    assert 50 <= len(want) <= 200
    # A chat model answering inside the template writes English and stops at <|im_end|>.
    assert result.finish_reason == "stop" and len(result.text.split()) > 5


def test_chat_messages_end_of_turn_and_stop_strings(
    fp32: tuple[Any, Any], smollm2_dir: Path
) -> None:
    """A messages prompt renders with the template (system turn included); a reply ends at
    the template's end-of-turn token, which the response text leaves out; a stop string cuts
    the reply where it first occurs and is left out too."""
    from transformers import AutoTokenizer

    off, _ = fp32
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    turns = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What colour is the sky on a clear day?"},
    ]
    want = tokenizer.encode(
        tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert off.end_of_turn_ids == (end,)
    plain = SamplingConfig(temperature=0.0, max_tokens=64)
    [full] = off.generate_all([PromptInput("ignored", "m", messages=turns)], plain)
    assert full.prompt_token_ids == want
    assert full.finish_reason == "stop" and full.token_ids[-1] == end
    assert full.text and "<|im_end|>" not in full.text
    words = full.text.split()
    assert len(words) >= 3
    cut = f" {words[2]}"
    [stopped] = off.generate_all(
        [PromptInput("ignored", "m", messages=turns)],
        SamplingConfig(temperature=0.0, max_tokens=64, stop=(cut,)),
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(cut)]


def _strategy(engine: Any, name: str) -> Any:
    if name == "adaptive":
        # The roofline cost model instead of a calibrated one: what adaptive picks does not
        # matter here, only that whatever it picks, step by step, is lossless.
        cost = uncalibrated_cost_model(engine.drafters, engine.max_k)
        return build_adaptive_strategy(engine, engine.spec, cost)
    drafter, k = name.split("-")
    return FixedStrategy(DraftChoice(drafter, int(k)))


@pytest.mark.parametrize(
    "strategy", ["suffix-4", "suffix-6", "ngram-4", "suffix_tree-4", "adaptive"]
)
def test_fp32_greedy_is_bitwise_identical_to_plain_decoding(
    fp32: tuple[Any, Any], fp32_reference: list[SampleResult], strategy: str
) -> None:
    _, spec = fp32
    spec.set_strategy(_strategy(spec, strategy))
    spec.drain_steps()
    got = spec.generate_all(chat_prompts(strategy), GREEDY)
    steps = spec.drain_steps()
    assert all(len(r.token_ids) == RESPONSE_TOKENS for r in got)
    for a, b in zip(got, fp32_reference, strict=True):
        assert a.token_ids == b.token_ids, a.prompt_id
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < (
            FP32_LOGPROB_NATS
        )
    drafted = sum(r.num_draft_tokens for r in got)
    accepted = sum(r.num_accepted_tokens for r in got)
    # Speculation really ran, and some drafts were rejected: both paths were exercised.
    assert 0 < accepted < drafted
    assert any(s.k > 0 for s in steps)


@pytest.fixture(scope="module")
def bf16(smollm2_dir: Path, fp32: tuple[Any, Any]) -> Iterator[tuple[Any, Any]]:
    yield from _engines(smollm2_dir, "bfloat16", BF16_PROMPTS)


BF16_PROMPTS = 4
BF16_TOKENS = 96


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


BF16_GREEDY = SamplingConfig(
    temperature=0.0, max_tokens=BF16_TOKENS, ignore_eos=True, top_logprobs=2
)


@pytest.fixture(scope="module")
def bf16_reference(bf16: tuple[Any, Any]) -> list[SampleResult]:
    off, _ = bf16
    results: list[SampleResult] = off.generate_all(chat_prompts("off", BF16_PROMPTS), BF16_GREEDY)
    return results


@pytest.mark.parametrize("strategy", ["suffix-4", "ngram-4", "suffix_tree-4"])
def test_bf16_greedy_parts_from_plain_decoding_only_at_near_ties(
    bf16: tuple[Any, Any], bf16_reference: list[SampleResult], strategy: str
) -> None:
    _, spec = bf16
    spec.set_strategy(_strategy(spec, strategy))
    got = spec.generate_all(chat_prompts(strategy, BF16_PROMPTS), BF16_GREEDY)
    assert sum(r.num_accepted_tokens for r in got) > 0
    for a, b in zip(got, bf16_reference, strict=True):
        cut = first_divergence(a.token_ids, b.token_ids)
        same = len(b.token_ids) if cut is None else cut
        assert (
            max(
                (abs(x - y) for x, y in zip(a.logprobs[:same], b.logprobs[:same], strict=True)),
                default=0.0,
            )
            < BF16_LOGPROB_NATS
        )
        if cut is not None:
            top1, top2 = b.top_logprobs[cut][:2]
            assert top1 - top2 <= NEAR_TIE_NATS, (b.prompt_id, cut, top1, top2)


POSITIONS = 4
REPETITIVE = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"
"""A raw prompt (no chat template: 19 tokens, cheap to prefill hundreds of times) that n-gram
lookup drafts from, so drafts are both accepted and rejected."""


def _position_counts(results: Sequence[SampleResult]) -> list[Counter[int]]:
    return [Counter(r.token_ids[p] for r in results) for p in range(POSITIONS)]


def chi_square(a: Counter[int], b: Counter[int], bins: int) -> float:
    """Two-sample chi-square over the ``bins`` most common tokens of both plus the rest
    (``bins`` degrees of freedom)."""
    top = [t for t, _ in (a + b).most_common(bins)]
    na, nb = sum(a.values()), sum(b.values())
    rows = [(a[t], b[t]) for t in top]
    rows.append((na - sum(x for x, _ in rows), nb - sum(y for _, y in rows)))
    stat = 0.0
    for x, y in rows:
        total = x + y
        if total == 0:
            continue
        for observed, n in ((x, na), (y, nb)):
            expected = total * n / (na + nb)
            stat += (observed - expected) ** 2 / expected
    return stat


def assert_same_distribution(engines: tuple[Any, Any], samples: int, bins: int) -> None:
    """Plain and speculative (n-gram, k=3) sampling at temperature 1 draw the same tokens at
    each of the first POSITIONS positions (independent seeds for the two runs)."""
    off, spec = engines
    spec.set_strategy(FixedStrategy(DraftChoice("ngram", 3)))
    ids = [int(t) for t in off.engine.get_tokenizer().encode(REPETITIVE)]

    def draw(engine: Any, seed: int) -> list[SampleResult]:
        prompt = PromptInput(ids, f"dist-{seed}", n=samples)
        sampling = SamplingConfig(temperature=1.0, max_tokens=POSITIONS + 1, ignore_eos=True,
                                  seed=seed)  # fmt: skip
        results: list[SampleResult] = engine.generate_all([prompt], sampling)
        return results

    plain, speculative = draw(off, 1), draw(spec, 2)
    drafted = sum(r.num_draft_tokens for r in speculative)
    accepted = sum(r.num_accepted_tokens for r in speculative)
    assert 0 < accepted < drafted  # drafts were both accepted and rejected
    stats = [
        chi_square(a, b, bins)
        for a, b in zip(_position_counts(plain), _position_counts(speculative), strict=True)
    ]
    assert max(stats) < CHI2_CRITICAL[bins], stats


def test_fp32_sampling_keeps_the_policys_distribution(fp32: tuple[Any, Any]) -> None:
    assert_same_distribution(fp32, samples=512, bins=8)


def test_bf16_sampling_keeps_the_policys_distribution(bf16: tuple[Any, Any]) -> None:
    # Fewer samples and bins than in fp32: bf16 is emulated (~10x slower) on CPUs without
    # AVX512-BF16/AMX. 128 per side still puts a draft-biased sampler far past the bound.
    assert_same_distribution(bf16, samples=128, bins=4)
