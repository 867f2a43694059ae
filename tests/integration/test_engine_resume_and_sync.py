"""The engine's incremental API (submit/poll), resumed samples and weight sync, on real vLLM.

A resumed sample (migration or fault recovery) must equal the unmigrated one token for token,
with log-probs aligned; a weight sync must change what the engine generates exactly as loading
the new weights from scratch would.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(600)

GREEDY_ARGS = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def engine(draft_engine: Callable[..., Any]) -> Iterator[Any]:
    eng = draft_engine(24)
    yield eng
    eng.close()


def _prompts(kit: Path, count: int) -> list[Any]:
    import json

    from rlhfspec_workers.generation.records import PromptInput

    rows = (kit / "dataset" / "train.jsonl").read_text().splitlines()[:count]
    return [PromptInput(json.loads(r)["prompt"], f"p{i}") for i, r in enumerate(rows)]


def _run(eng: Any, prompts: list[Any]) -> dict[str, Any]:
    from rlhfspec_workers.generation.records import SamplingConfig

    sampling = SamplingConfig(**GREEDY_ARGS)  # type: ignore[arg-type]
    for p in prompts:
        eng.submit(p, sampling, 0)
    out: dict[str, Any] = {}
    while eng.running:
        for r in eng.poll():
            out[r.prompt_id] = r
    return out


def test_resumed_greedy_sample_equals_the_unmigrated_one(engine: Any, tiny_kit: Path) -> None:
    from dataclasses import replace

    from rlhfspec_workers.generation.records import SamplingConfig

    prompts = _prompts(tiny_kit, 6)
    whole = _run(engine, prompts)
    sampling = SamplingConfig(**GREEDY_ARGS)  # type: ignore[arg-type]
    for p in prompts:
        full = whole[p.prompt_id]
        cut = max(1, len(full.token_ids) // 2)
        resumed_input = replace(p, max_tokens=GREEDY_ARGS["max_tokens"] - cut)
        engine.submit(resumed_input, sampling, 0, prefix_token_ids=full.token_ids[:cut])
        (tail,) = _drain(engine)
        assert full.token_ids[:cut] + tail.token_ids == full.token_ids
        assert tail.prompt_token_ids == full.prompt_token_ids  # the original prompt is reported
        # Log-probs of the continuation are conditioned on the same prefix: they match.
        assert tail.logprobs == pytest.approx(full.logprobs[cut:], abs=1e-4)


def _drain(engine: Any) -> list[Any]:
    done: list[Any] = []
    while engine.running:
        done.extend(engine.poll())
    return done


def test_weight_sync_changes_generation_like_a_fresh_load(
    engine: Any, tiny_kit: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    prompts = _prompts(tiny_kit, 4)
    before = _run(engine, prompts)
    # A different policy: the tiny policy with its output head perturbed (deterministically).
    new_dir = tmp_path / "v1"
    shutil.copytree(tiny_kit / "policy", new_dir)
    (weights,) = list(new_dir.glob("*.safetensors"))
    state = load_file(str(weights))
    gen = torch.Generator().manual_seed(0)
    head = next(k for k in state if "lm_head" in k or "embed_tokens" in k)
    state[head] = state[head] + 0.5 * torch.randn(state[head].shape, generator=gen)
    save_file(state, str(weights), metadata={"format": "pt"})
    engine.load_weights(new_dir, version=1)
    assert engine.weight_version == 1
    after = _run(engine, prompts)
    assert [after[p.prompt_id].token_ids for p in prompts] != [
        before[p.prompt_id].token_ids for p in prompts
    ]
    # Back to the original weights: generation returns exactly to what it was.
    engine.load_weights(tiny_kit / "policy", version=2)
    again = _run(engine, prompts)
    assert [again[p.prompt_id].token_ids for p in prompts] == [
        before[p.prompt_id].token_ids for p in prompts
    ]


def test_weight_sync_refuses_while_samples_are_in_flight(engine: Any, tiny_kit: Path) -> None:
    from rlhfspec_workers.generation.records import SamplingConfig

    (p,) = _prompts(tiny_kit, 1)
    request = engine.submit(p, SamplingConfig(**GREEDY_ARGS), 0)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="in flight"):
        engine.load_weights(tiny_kit / "policy", version=3)
    engine.abort([request])
    assert engine.running == 0


def test_preempted_mid_flight_sample_resumed_elsewhere_equals_the_unmigrated_one(
    engine: Any, tiny_kit: Path
) -> None:
    """Migration by recompute: abort after a few steps, hand the tokens and log-probs so far
    to a resumed request with max_tokens reduced; stitched, it is the unmigrated sample."""
    from dataclasses import replace

    from rlhfspec_workers.generation.records import SamplingConfig

    prompts = _prompts(tiny_kit, 5)
    whole = _run(engine, prompts)
    sampling = SamplingConfig(**GREEDY_ARGS)  # type: ignore[arg-type]
    requests = {p.prompt_id: engine.submit(p, sampling, 0) for p in prompts}
    finished_early = {r.prompt_id for _ in range(2) for r in engine.poll()}
    handed_over: dict[str, tuple[list[int], list[float]]] = {}
    for p in prompts:
        if p.prompt_id in finished_early:
            continue
        so_far = engine.generated_so_far(requests[p.prompt_id])
        tokens, logprobs = engine.preempt(requests[p.prompt_id])
        assert len(tokens) == so_far == len(logprobs) and so_far > 0
        handed_over[p.prompt_id] = (tokens, logprobs)
    assert engine.running == 0
    for p in prompts:
        if p.prompt_id in handed_over:
            tokens, _ = handed_over[p.prompt_id]
            resumed = replace(p, max_tokens=GREEDY_ARGS["max_tokens"] - len(tokens))
            engine.submit(resumed, sampling, 0, prefix_token_ids=tokens)
    tails = {r.prompt_id: r for r in _drain(engine)}
    for prompt_id, (tokens, logprobs) in handed_over.items():
        full = whole[prompt_id]
        assert tokens + tails[prompt_id].token_ids == full.token_ids
        assert logprobs + tails[prompt_id].logprobs == pytest.approx(full.logprobs, abs=1e-4)
    assert len(handed_over) >= 3
