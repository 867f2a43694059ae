"""Speculative decoding adds no rollout-vs-trainer log-prob mismatch.

The trainer's ratio uses its own old log-probs, but it reports how far the engine's sampled
log-probs are from its forward at the same weights (``TrainStats.logprob_mismatch_*``,
``rollout_kl``). A speculative step scores k+1 tokens in one forward and returns their
log-probs from that verification pass; if that pass (or the acceptance path) returned other
numbers than plain one-token decoding, the mismatch with speculation on would exceed the
mismatch with it off. Both engines here run the tiny policy in fp32 on the same prompts and
seeds: plain decoding (``speculative.mode: off``), and the job's engine with the tiny draft
model at a fixed k = 4.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhfspec_api.generation import GenerationSpec
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.generation.draft_strategy import DraftChoice, FixedStrategy
from rlhfspec_workers.generation.engine import GenerationEngine, PromptInput, SamplingConfig
from rlhfspec_workers.messages import Experience, Rollout
from rlhfspec_workers.tinymodels.task import read_dataset_jsonl
from rlhfspec_workers.tinymodels.tokenizer import encode_chars
from rlhfspec_workers.trainer.policy_trainer import PolicyTrainer, TrainStats

pytestmark = pytest.mark.engine
CPU = torch.device("cpu")
MAX_TOKENS = 48
PROMPTS, SAMPLES = 12, 4
SAMPLING = SamplingConfig(temperature=1.0, max_tokens=MAX_TOKENS, seed=7)


@pytest.fixture(scope="module")
def off_engine(tiny_kit: Path) -> Iterator[Any]:
    spec = GenerationSpec.model_validate(
        {"maxNewTokens": MAX_TOKENS, "speculative": {"mode": "off"}}
    )
    engine = GenerationEngine(
        spec, tiny_kit / "policy", dtype="float32", max_num_seqs=16, kv_cache_bytes=64 << 20
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def on_engine(draft_engine: Callable[..., Any], off_engine: Any) -> Iterator[Any]:
    engine = draft_engine(MAX_TOKENS)
    engine.set_strategy(FixedStrategy(DraftChoice("draft_model", 4)))
    yield engine
    engine.close()


def _prompts(kit: Path) -> list[PromptInput]:
    rows = read_dataset_jsonl(kit / "dataset" / "eval.jsonl")[:PROMPTS]
    return [
        PromptInput(encode_chars(row.prompt, add_bos=True), f"p{i}", n=SAMPLES)
        for i, row in enumerate(rows)
    ]


def _experiences(results: list[Any]) -> list[Experience]:
    out = []
    for r in results:
        rollout = Rollout(
            iteration=1,
            sample_id=r.sample_id,
            prompt_id=r.prompt_id,
            group_id=r.group_id,
            sample_index=r.sample_index,
            prompt="",
            prompt_token_ids=r.prompt_token_ids,
            token_ids=r.token_ids,
            logprobs=r.logprobs,
            text=r.text or "",
            finish_reason=r.finish_reason or "length",
            weight_version=0,
            worker="test",
        )
        # Any reward and reference: the mismatch is measured before the first step.
        reward = float(len(r.token_ids) % 2)
        out.append(Experience(rollout=rollout, reward=reward, ref_logprobs=r.logprobs))
    return out


def _mismatch(kit: Path, results: list[Any]) -> TrainStats:
    spec = RLHFJobSpec.model_validate(
        {
            "algorithm": {
                "promptsPerIteration": PROMPTS,
                "samplesPerPrompt": SAMPLES,
                "microBatchSize": 16,
            },
            "models": {"policy": {"path": str(kit / "policy")}},
            "dataset": {"path": "unused.jsonl"},
        }
    )
    return PolicyTrainer(spec, kit / "policy", device=CPU).train_iteration(_experiences(results))


def test_speculation_adds_no_logprob_mismatch(
    tiny_kit: Path, off_engine: Any, on_engine: Any
) -> None:
    prompts = _prompts(tiny_kit)
    off = off_engine.generate_all(prompts, SAMPLING)
    on = on_engine.generate_all(prompts, SAMPLING)
    assert len(off) == len(on) == PROMPTS * SAMPLES
    # Speculation really ran: most emitted tokens came through draft verification.
    accepted = sum(r.num_accepted_tokens for r in on)
    assert sum(r.num_draft_tokens for r in on) > 0 and accepted > 0
    tokens = sum(len(r.token_ids) for r in on)
    assert tokens > 3 * len(on)  # real answers, not just EOS
    off_stats, on_stats = _mismatch(tiny_kit, off), _mismatch(tiny_kit, on)
    print(
        f"mismatch off: mean {off_stats.logprob_mismatch_mean:.2e} max "
        f"{off_stats.logprob_mismatch_max:.2e} kl {off_stats.rollout_kl:.2e}; on (draft k=4, "
        f"{accepted}/{tokens} tokens accepted): mean {on_stats.logprob_mismatch_mean:.2e} "
        f"max {on_stats.logprob_mismatch_max:.2e} kl {on_stats.rollout_kl:.2e}"
    )
    # fp32 engine vs fp32 trainer: the same numbers up to kernel rounding, both ways.
    assert off_stats.logprob_mismatch_max < 1e-4
    assert on_stats.logprob_mismatch_max < 1e-4
    # Speculation adds nothing beyond that rounding.
    assert on_stats.logprob_mismatch_mean <= off_stats.logprob_mismatch_mean + 2e-6
    assert on_stats.rollout_kl <= off_stats.rollout_kl + 1e-9


def test_weight_sync_leaves_no_logprob_mismatch(
    tiny_kit: Path, off_engine: Any, tmp_path: Path
) -> None:
    """After a sync the engine samples from the trainer's exported policy: its log-probs equal
    the trainer's forward at those weights as closely as a fresh engine's (~1e-5 at most)."""
    prompts = _prompts(tiny_kit)
    spec = RLHFJobSpec.model_validate(
        {
            "algorithm": {
                "promptsPerIteration": PROMPTS,
                "samplesPerPrompt": SAMPLES,
                "microBatchSize": 16,
                "learningRate": 1e-3,
            },
            "models": {"policy": {"path": str(tiny_kit / "policy")}},
            "dataset": {"path": "unused.jsonl"},
        }
    )
    trainer = PolicyTrainer(spec, tiny_kit / "policy", device=CPU)
    trainer.train_iteration(_experiences(off_engine.generate_all(prompts, SAMPLING)))
    exported = trainer.export_weights(tmp_path / "v1", dtype=torch.float32)
    off_engine.load_weights(exported, version=1)
    try:
        synced = off_engine.generate_all(prompts, SAMPLING)
    finally:
        off_engine.load_weights(tiny_kit / "policy", version=2)
    measured = PolicyTrainer(spec, exported, device=CPU).train_iteration(_experiences(synced))
    print(f"after sync: mismatch max {measured.logprob_mismatch_max:.2e}")
    assert measured.logprob_mismatch_max < 1e-4
