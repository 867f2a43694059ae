"""The inference stage and the trainer on the real tiny kit: rule and model rewards,
ExperienceMaker's alignment and reference log-probs, a GRPO and a PPO iteration on its output,
and (engine) vLLM's log-probs of the trainer's exported weights equal ``response_logprobs``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhfspec_api.rewards import RewardRule
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.inference.experience import ExperienceMaker
from rlhfspec_workers.messages import Rollout
from rlhfspec_workers.rewards.registry import rule_reward
from rlhfspec_workers.tinymodels.task import read_dataset_jsonl
from rlhfspec_workers.tinymodels.tokenizer import EOS_ID, encode_chars
from rlhfspec_workers.torch_models import load_causal_lm, pad_batch, response_logprobs
from rlhfspec_workers.trainer.policy_trainer import PolicyTrainer

CPU = torch.device("cpu")
SAMPLES_PER_PROMPT = 4


def _spec(algorithm: str) -> RLHFJobSpec:
    ppo = algorithm == "ppo"
    models: dict[str, Any] = {"policy": {"path": "tiny://policy"}}
    if ppo:
        models |= {"critic": {"path": "tiny://reward"}, "reward": {"path": "tiny://reward"}}
    return RLHFJobSpec.model_validate(
        {
            "algorithm": {
                "name": algorithm,
                "promptsPerIteration": 3,
                "samplesPerPrompt": SAMPLES_PER_PROMPT,
                "microBatchSize": 4,
            },
            "models": models,
            "reward": {"type": "model"} if ppo else {"type": "rule", "rule": "sort_digits"},
            "dataset": {"path": "tiny://dataset/train.jsonl"},
            "inference": {"batchSize": 5},  # not a divisor of 12: the last batch is partial
        }
    )


def _rollout(prompt: str, answer: str, text: str, index: int, logprobs: list[float]) -> Rollout:
    token_ids = [*encode_chars(text), EOS_ID]
    return Rollout(
        iteration=1,
        sample_id=f"it1/{prompt}/{index}",
        prompt_id=prompt,
        group_id=prompt,
        sample_index=index,
        prompt=prompt,
        answer=answer,
        prompt_token_ids=encode_chars(prompt, add_bos=True),
        token_ids=token_ids,
        logprobs=logprobs or [0.0] * len(token_ids),
        text=text,
        finish_reason="stop",
        weight_version=0,
        worker="test",
    )


def _rollouts(kit: Path, policy: Any | None = None) -> list[Rollout]:
    """3 prompts x 4 answers: the right one, then wrong ones. Log-probs from ``policy``."""
    rng = random.Random(0)
    rows = read_dataset_jsonl(kit / "dataset" / "eval.jsonl")[:3]
    out = []
    for row in rows:
        shuffled = "".join(rng.sample(row.answer, len(row.answer)))
        wrong = [row.answer[::-1] + "1", row.answer[1:], shuffled]
        for index, text in enumerate([row.answer, *wrong]):
            out.append(_rollout(row.prompt, row.answer, text, index, []))
    if policy is None:
        return out
    batch = pad_batch([r.prompt_token_ids for r in out], [r.token_ids for r in out], 0, EOS_ID)
    with torch.no_grad():
        logp = response_logprobs(policy, batch).tolist()
    return [
        r.model_copy(update={"logprobs": lp[: len(r.token_ids)]})
        for r, lp in zip(out, logp, strict=True)
    ]


def test_rule_reward_scores_a_correct_sort_one(tiny_kit: Path) -> None:
    reward = rule_reward(RewardRule.SORT_DIGITS)
    good = _rollout("S31415926=", "11234569", "11234569", 0, [])
    cut_off = good.model_copy(update={"finish_reason": "length"})
    wrong = _rollout("S31415926=", "11234569", "1123459", 1, [])
    with_eos_text = good.model_copy(update={"text": "11234569<eos>"})
    assert reward([good, wrong, cut_off, with_eos_text]) == [1.0, 0.0, 0.0, 1.0]


def test_experience_maker_aligns_and_reference_equals_initial_policy(tiny_kit: Path) -> None:
    policy = load_causal_lm(tiny_kit / "policy", CPU)
    rollouts = _rollouts(tiny_kit, policy)
    maker = ExperienceMaker(_spec("grpo"), {"spec.models.policy": tiny_kit / "policy"}, CPU)
    experiences = maker.make(rollouts)
    assert [e.rollout.sample_id for e in experiences] == [r.sample_id for r in rollouts]
    assert [e.reward for e in experiences] == [1.0, 0.0, 0.0, 0.0] * 3
    # Rewards alone (held-out evaluation): the same scores, batch by batch (5 + 5 + 2).
    assert maker.score(rollouts) == [1.0, 0.0, 0.0, 0.0] * 3
    for e in experiences:
        assert len(e.ref_logprobs) == len(e.rollout.token_ids) == len(e.rollout.logprobs)
        assert e.values is None
        # Before training the reference is the policy: KL 0 up to batch-shape rounding.
        assert e.ref_logprobs == pytest.approx(e.rollout.logprobs, abs=1e-5)
        assert all(lp < 0 for lp in e.ref_logprobs)
    assert maker.last_stats.samples == 12 and maker.last_stats.reference_seconds > 0

    trainer = PolicyTrainer(_spec("grpo"), tiny_kit / "policy", device=CPU)
    stats = trainer.train_iteration(experiences)
    assert stats.reward_mean == pytest.approx(0.25)
    # KL is measured during the update (the second mini-batch after one step): small, not 0.
    assert 0.0 < stats.kl < 1.0 and stats.grad_norm > 0


def test_ppo_experience_with_reward_model_and_critic(tiny_kit: Path) -> None:
    policy = load_causal_lm(tiny_kit / "policy", CPU)
    rollouts = _rollouts(tiny_kit, policy)
    models = {
        "spec.models.policy": tiny_kit / "policy",
        "spec.models.critic": tiny_kit / "reward",
        "spec.models.reward": tiny_kit / "reward",
    }
    maker = ExperienceMaker(_spec("ppo"), models, CPU)
    experiences = maker.make(rollouts)
    scores = torch.tensor([e.reward for e in experiences]).view(3, SAMPLES_PER_PROMPT)
    # The reward model prefers the sorted answer to the plainly wrong ones.
    assert float(scores[:, 0].mean()) > float(scores[:, 1:].mean()) + 1.0, scores
    for e in experiences:
        assert e.values is not None and len(e.values) == len(e.rollout.token_ids)
    # The critic starts as the reward model: its value after the last answer digit (before
    # EOS) is the reward model's score of the whole answer.
    last = torch.tensor([e.values[-1] for e in experiences if e.values])
    assert last.tolist() == pytest.approx(scores.flatten().tolist(), abs=1e-4)

    trainer = PolicyTrainer(
        _spec("ppo"), tiny_kit / "policy", tiny_kit / "reward", device=CPU, recompute_values=False
    )
    stats = trainer.train_iteration(experiences)
    assert stats.value_loss is not None and torch.isfinite(torch.tensor(stats.value_loss))
    assert stats.value_loss > 0
