"""A draft distilled from the tiny policy's own rollouts: sampled by vLLM from the policy's
distribution, built from its layers, trained by forward KL, accepted more often than the
layer-subset start; bad input refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhfspec_workers.distill.acceptance import acceptance_report
from rlhfspec_workers.distill.layers import DraftInputError, draft_from_policy, pick_layers
from rlhfspec_workers.distill.rollouts import policy_sampler, prompt_token_ids, sample_rollouts
from rlhfspec_workers.distill.train import distill
from rlhfspec_workers.torch_models import eos_token_id, load_causal_lm


def test_layers_are_evenly_spaced_and_bounded() -> None:
    assert pick_layers(30, 1) == [0]
    assert pick_layers(30, 2) == [0, 29]
    assert pick_layers(30, 4) == [0, 10, 19, 29]
    assert pick_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(DraftInputError, match="--layers: 5 layers asked of a policy with 4"):
        pick_layers(4, 5)


@pytest.fixture(scope="module")
def sampler(tiny_kit: Path) -> Iterator[Any]:
    # fp32: the sampled tokens' log-probs are compared with the transformers policy's.
    with policy_sampler(tiny_kit / "policy", max_model_len=128, dtype="float32") as llm:
        yield llm


def test_rollouts_are_the_policys_own_samples(tiny_kit: Path, sampler: Any) -> None:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    policy_dir = tiny_kit / "policy"
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    prompts = prompt_token_ids(tokenizer, tiny_kit / "dataset" / "train.jsonl")[:40]
    stop = eos_token_id(policy_dir) or 2
    rollouts = sample_rollouts(
        sampler, prompts, max_new_tokens=24, token_budget=150, stop_ids=[stop], batch_size=8
    )
    total = sum(len(e.response_ids) for e in rollouts)
    # Whole batches of 8 until the budget is met, and no batch more.
    assert total >= 150 and len(rollouts) % 8 == 0 and len(rollouts) < len(prompts)
    assert total - sum(len(e.response_ids) for e in rollouts[-8:]) < 150
    for example in rollouts:
        assert example.prompt_ids in prompts
        body = example.response_ids[:-1]
        assert stop not in body
        # Ended by the stop id (kept, so the draft learns it) or by the length limit.
        assert example.response_ids[-1] == stop or len(example.response_ids) == 24

    # Temperature 1 over the whole vocabulary: each sampled token's log-prob under vLLM is
    # the transformers policy's, so the draft learns the policy's own distribution.
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, logprobs=0)
    results = sampler.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:6]], params)
    policy = load_causal_lm(policy_dir, torch.device("cpu")).float()
    for prompt, result in zip(prompts[:6], results, strict=True):
        out = result.outputs[0]
        ids = torch.tensor([prompt + list(out.token_ids)])
        with torch.no_grad():
            logprobs = torch.log_softmax(policy(ids).logits[0].float(), dim=-1)
        for i, token in enumerate(out.token_ids):
            expected = float(logprobs[len(prompt) - 1 + i, token])
            assert out.logprobs[i][token].logprob == pytest.approx(expected, abs=2e-3)


def test_distillation_raises_acceptance_over_the_layer_subset(tiny_kit: Path, sampler: Any) -> None:
    from transformers import AutoTokenizer

    policy_dir = tiny_kit / "policy"
    torch.manual_seed(0)
    policy = load_causal_lm(policy_dir, torch.device("cpu")).float()
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    prompts = prompt_token_ids(tokenizer, tiny_kit / "dataset" / "train.jsonl")
    stops = [eos_token_id(policy_dir) or 2]
    sample = dict(max_new_tokens=40, stop_ids=stops, batch_size=32)
    train = sample_rollouts(sampler, prompts[16:400], token_budget=2000, seed=0, **sample)
    held_out = sample_rollouts(sampler, prompts[:16], token_budget=10**9, seed=1, **sample)
    assert sum(len(e.response_ids) for e in train) >= 2000

    draft = draft_from_policy(policy, 1)
    assert draft.config.num_hidden_layers == 1
    # The shared embedding/head are the policy's and stay frozen; the block is layer 0's.
    assert torch.equal(draft.lm_head.weight, policy.lm_head.weight.float())
    assert not draft.lm_head.weight.requires_grad
    before = acceptance_report(policy, draft, held_out)
    stats = distill(policy, draft, train, steps=40, batch_size=16, learning_rate=1e-3)
    after = acceptance_report(policy, draft, held_out)

    assert stats.last_loss < stats.first_loss
    assert after.mean_alpha > before.mean_alpha + 0.05, (before, after)
    assert after.expected_accepted > before.expected_accepted
    # Later positions are accepted less often: each needs all earlier ones.
    assert list(after.per_position) == sorted(after.per_position, reverse=True)
    # The policy as its own draft accepts everything: the measure is calibrated.
    assert acceptance_report(policy, policy, held_out[:4]).mean_alpha == pytest.approx(1.0)


def _distill_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", "models", "distill-draft", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_writes_a_draft_directory_and_its_report(tiny_kit: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "draft"
    result = _distill_cli(
        "--policy", "tiny://policy", "--out", str(out), "--layers", "1", "--tokens", "1500",
        "--steps", "30", "--lr", "1e-3", "--batch-size", "16", "--max-new-tokens", "40",
        "--dataset", str(tiny_kit / "dataset" / "train.jsonl"), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    # stdout is the report and the directory, nothing else (vLLM logs to stderr).
    *report_lines, last = result.stdout.strip().splitlines()
    report = json.loads("\n".join(report_lines))
    assert last == str(out)
    assert report == json.loads((out / "distill.json").read_text())
    assert report["layers"] == [0] and report["policy_layers"] == 4
    assert 0 < report["draft_parameters"] < report["policy_parameters"]
    assert report["rollout_tokens"] >= 1500 and report["steps"] == 30
    assert report["sampling_seconds"] > 0 and report["distill_seconds"] > 0
    before, after = report["acceptance_before"], report["acceptance_after"]
    assert len(after["per_position"]) == 4 and after["tokens"] > 0
    assert after["expected_accepted"] > before["expected_accepted"]
    # A standard HF directory: config and tokenizer load as the draft_model drafter loads them.
    config = AutoConfig.from_pretrained(str(out))
    assert config.num_hidden_layers == 1 and config.architectures == ["LlamaForCausalLM"]
    policy_tokenizer = AutoTokenizer.from_pretrained(str(tiny_kit / "policy"))
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == policy_tokenizer.get_vocab()


def test_cli_refuses_more_layers_than_the_policy_has(tiny_kit: Path, tmp_path: Path) -> None:
    result = _distill_cli(
        "--policy",
        str(tiny_kit / "policy"),
        "--out",
        str(tmp_path / "d"),
        "--layers",
        "9",
        "--dataset",
        str(tiny_kit / "dataset" / "train.jsonl"),
    )
    assert result.returncode == 1
    assert "--layers: 9 exceeds the policy's 4 (1..4)" in result.stderr
    assert not (tmp_path / "d").exists()


def test_cli_refuses_an_unsupported_architecture(tmp_path: Path) -> None:
    model = tmp_path / "gpt2"
    model.mkdir()
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2}
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    result = _distill_cli(
        "--policy", str(model), "--out", str(tmp_path / "d"), "--dataset", str(data)
    )
    assert result.returncode == 1
    assert "--policy: architecture GPT2LMHeadModel is not supported" in result.stderr
    assert "LlamaForCausalLM" in result.stderr
