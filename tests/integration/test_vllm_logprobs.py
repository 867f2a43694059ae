"""vLLM serves the trainer's exported weights, and its sampled log-probs are the trainer's.

The on-policy ratio in GRPO/PPO divides the trainer's ``response_logprobs`` by the log-probs
vLLM returned when sampling; if the two disagreed, the first update of every iteration would
already be off-policy. One fp32 in-process engine (no speculation) on weights exported after a
GRPO step, sampled at temperatures 1.0 and 0.7 with ``processed_logprobs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.inference.experience import ExperienceMaker
from rlhfspec_workers.messages import Rollout
from rlhfspec_workers.tinymodels.task import read_dataset_jsonl
from rlhfspec_workers.tinymodels.tokenizer import EOS_ID, encode_chars
from rlhfspec_workers.torch_models import pad_batch, response_logprobs
from rlhfspec_workers.trainer.policy_trainer import PolicyTrainer

pytestmark = pytest.mark.engine
CPU = torch.device("cpu")


def _trained_export(kit: Path, out: Path) -> PolicyTrainer:
    spec = RLHFJobSpec.model_validate(
        {
            "algorithm": {
                "promptsPerIteration": 2,
                "samplesPerPrompt": 2,
                "microBatchSize": 4,
                "learningRate": 1e-3,
            },
            "models": {"policy": {"path": str(kit / "policy")}},
            "dataset": {"path": "unused.jsonl"},
        }
    )
    rows = read_dataset_jsonl(kit / "dataset" / "eval.jsonl")[:2]
    rollouts = []
    for g, row in enumerate(rows):
        for k, text in enumerate([row.answer, row.answer[::-1]]):
            ids = [*encode_chars(text), EOS_ID]
            rollouts.append(
                Rollout(
                    iteration=1,
                    sample_id=f"{g}/{k}",
                    prompt_id=str(g),
                    group_id=str(g),
                    sample_index=k,
                    prompt=row.prompt,
                    prompt_token_ids=encode_chars(row.prompt, add_bos=True),
                    token_ids=ids,
                    logprobs=[0.0] * len(ids),
                    text=text,
                    finish_reason="stop",
                    weight_version=0,
                    worker="test",
                )
            )
    experiences = ExperienceMaker(spec, {"spec.models.policy": kit / "policy"}, CPU).make(rollouts)
    # Old log-probs = reference log-probs (the initial policy's), as vLLM would have returned.
    experiences = [
        e.model_copy(update={"rollout": e.rollout.model_copy(update={"logprobs": e.ref_logprobs})})
        for e in experiences
    ]
    trainer = PolicyTrainer(spec, kit / "policy", device=CPU)
    trainer.train_iteration(experiences)
    trainer.export_weights(out, dtype=torch.float32)
    return trainer


def test_vllm_logprobs_of_exported_weights_match_response_logprobs(
    tiny_kit: Path, tmp_path: Path
) -> None:
    from rlhfspec_workers.tinymodels.engine import cpu_engine_env

    trainer = _trained_export(tiny_kit, tmp_path / "v1")
    cpu_engine_env()
    torch.set_num_threads(1)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm: Any = LLM(
        model=str(tmp_path / "v1"),
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
        kv_cache_memory_bytes=32 << 20,
        logprobs_mode="processed_logprobs",
        seed=0,
    )
    prompts = [row.prompt for row in read_dataset_jsonl(tiny_kit / "dataset" / "eval.jsonl")[:8]]
    prompt_ids = [encode_chars(p, add_bos=True) for p in prompts]
    for temperature in (1.0, 0.7):
        params = SamplingParams(temperature=temperature, max_tokens=48, logprobs=0, seed=1)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params)
        responses = [list(o.outputs[0].token_ids) for o in outputs]
        vllm_logp = [
            [float(lp[t].logprob) for lp, t in zip(o.outputs[0].logprobs, r, strict=True)]
            for o, r in zip(outputs, responses, strict=True)
        ]
        batch = pad_batch(prompt_ids, responses, 0, EOS_ID)
        with torch.no_grad():
            ours = response_logprobs(trainer.policy, batch, temperature)
        worst = max(
            abs(float(ours[i, j]) - v) for i, row in enumerate(vllm_logp) for j, v in enumerate(row)
        )
        print(f"temperature {temperature}: max |vLLM - response_logprobs| = {worst:.2e}")
        assert worst < 1e-4, (temperature, worst)
        assert sum(len(r) for r in responses) > 3 * len(responses)  # real samples, not just EOS
