"""vllm_fixes cost 2: a step in which no request has a draft takes vLLM's plain sampler instead
of the rejection sampler, and nothing a sample carries changes: a proposer engine drafting
nothing gives, seed for seed, the tokens and logprobs of the rejection-sampler path and of an
engine without speculation."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from rlhfspec_workers import vllm_fixes

pytestmark = pytest.mark.engine

MAX_TOKENS = 12
SEED = 11


def _prompts(count: int) -> list[Any]:
    from rlhfspec_workers.generation.records import PromptInput
    from rlhfspec_workers.tinymodels.tokenizer import VOCAB_SIZE

    rng = random.Random(5)
    return [
        PromptInput([rng.randrange(3, VOCAB_SIZE) for _ in range(8)], f"u{i}") for i in range(count)
    ]


def _sampling() -> Any:
    from rlhfspec_workers.generation.records import SamplingConfig

    return SamplingConfig(temperature=1.0, max_tokens=MAX_TOKENS, seed=SEED, ignore_eos=True)


@contextmanager
def _rejection_sampler_calls(*, original: bool) -> Iterator[list[int]]:
    """Counts calls that reach vLLM's own rejection sampler; ``original=True`` routes every
    step there, as without the fix."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    patched = RejectionSampler.forward
    vllm_forward = patched.__wrapped__  # type: ignore[attr-defined]
    calls: list[int] = []

    def counting(self: Any, metadata: Any, *args: Any) -> Any:
        calls.append(metadata.max_spec_len)
        return vllm_forward(self, metadata, *args)

    routed = counting if original else vllm_fixes._plain_when_undrafted(counting)
    RejectionSampler.forward = routed  # type: ignore[method-assign,assignment]
    try:
        yield calls
    finally:
        RejectionSampler.forward = patched  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def k0_engine(draft_engine: Callable[..., Any]) -> Iterator[Any]:
    from rlhfspec_workers.generation.draft_strategy import NO_DRAFT, FixedStrategy

    eng = draft_engine(MAX_TOKENS)
    eng.set_strategy(FixedStrategy(NO_DRAFT))
    yield eng
    eng.close()


def _run(engine: Any) -> list[tuple[list[int], list[float]]]:
    results = engine.generate_all(_prompts(6), _sampling())
    assert [len(r.token_ids) for r in results] == [MAX_TOKENS] * 6
    return [(r.token_ids, r.logprobs) for r in results]


def test_the_fix_is_applied_once(k0_engine: Any) -> None:
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    assert "plain_sampler_when_undrafted" in k0_engine.vllm_fixes
    forward = RejectionSampler.forward
    vllm_fixes.apply()
    assert RejectionSampler.forward is forward  # idempotent: no double wrapping


def test_undrafted_steps_skip_the_rejection_sampler_and_change_nothing(
    k0_engine: Any, tiny_kit: Path
) -> None:
    with _rejection_sampler_calls(original=False) as fixed_calls:
        fixed = _run(k0_engine)
    with _rejection_sampler_calls(original=True) as original_calls:
        original = _run(k0_engine)
    assert fixed_calls == []  # no step had a draft, so none reached the rejection sampler
    assert original_calls and set(original_calls) == {0}  # the old path: every step did
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(fixed, original, strict=True):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-5)
    assert len({tuple(t) for t, _ in fixed}) > 1  # sampled, not one repeated sequence

    from rlhfspec_api.generation import GenerationSpec
    from rlhfspec_workers.generation.engine import GenerationEngine

    off = GenerationEngine(
        GenerationSpec.model_validate({"maxNewTokens": MAX_TOKENS, "speculative": {"mode": "off"}}),
        tiny_kit / "policy",
        dtype="float32",
        max_num_seqs=16,
        kv_cache_bytes=64 << 20,
    )
    try:
        plain = _run(off)
    finally:
        off.close()
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(fixed, plain, strict=True):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)


def test_steps_with_drafts_still_take_the_rejection_sampler(k0_engine: Any) -> None:
    from rlhfspec_workers.generation.draft_strategy import NO_DRAFT, DraftChoice, FixedStrategy

    k0_engine.set_strategy(FixedStrategy(DraftChoice("draft_model", 2)))
    try:
        with _rejection_sampler_calls(original=False) as calls:
            results = k0_engine.generate_all(_prompts(6), _sampling())
    finally:
        k0_engine.set_strategy(FixedStrategy(NO_DRAFT))
    assert sum(r.num_draft_tokens for r in results) > 0
    assert calls and max(calls) == 2
