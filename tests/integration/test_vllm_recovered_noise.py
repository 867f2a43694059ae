"""vllm_fixes cost 1: recovered-token noise drawn only for requests with drafts gives exactly
the original's tokens for seeded requests, and nothing is drawn for rows without drafts."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rlhfspec_workers import vllm_fixes

# The recovery kernel's CPU implementation is registered when a vLLM engine starts.
pytestmark = pytest.mark.engine


def _inputs(num_draft_tokens: list[int], vocab: int = 64) -> dict[str, object]:
    torch.manual_seed(0)
    total = sum(num_draft_tokens)
    cu = torch.tensor(num_draft_tokens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return {
        "max_spec_len": max(num_draft_tokens),
        "num_draft_tokens": num_draft_tokens,
        "cu_num_draft_tokens": cu,
        "draft_token_ids": torch.randint(0, vocab, (total,), dtype=torch.int32),
        "draft_probs": None,
        "target_probs": torch.softmax(torch.randn(total, vocab), dim=-1),
        "device": torch.device("cpu"),
    }


def _seeded(n: int) -> SimpleNamespace:
    return SimpleNamespace(generators={i: torch.Generator().manual_seed(100 + i) for i in range(n)})


def test_sparse_noise_gives_the_original_tokens_for_seeded_requests(spec_engine: Any) -> None:
    from vllm.v1.sample import rejection_sampler as rs

    vllm_fixes._patch_recovered()
    patched = rs.sample_recovered_tokens
    assert getattr(patched, vllm_fixes._SPARSE, False)
    original = patched.__wrapped__  # type: ignore[attr-defined]
    drafts = [0, 3, 0, 0, 2, 1, 0, 4]  # half the rows draft nothing
    for _ in range(3):
        want = original(**_inputs(drafts), sampling_metadata=_seeded(len(drafts)))
        got = patched(**_inputs(drafts), sampling_metadata=_seeded(len(drafts)))
        assert torch.equal(got, want)
    # No drafts at all: nothing to recover, nothing drawn from any generator.
    meta = _seeded(4)
    before = [g.get_state().clone() for g in meta.generators.values()]
    none = patched(**_inputs([0, 0, 0, 0]), sampling_metadata=meta)
    assert none.numel() == 0
    after = [g.get_state() for g in meta.generators.values()]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
