"""PolicyTrainer and CheckpointStore on random tiny Llamas: GRPO raises the rewarded
response's log-prob, PPO trains a critic, micro-batching does not change the update, exports
load in transformers, and a restored checkpoint continues bit-exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.messages import Experience, Rollout
from rlhfspec_workers.tinymodels.tokenizer import save_tokenizer
from rlhfspec_workers.torch_models import load_causal_lm, pad_batch, response_logprobs
from rlhfspec_workers.trainer.checkpoint import CheckpointStore
from rlhfspec_workers.trainer.policy_trainer import PolicyTrainer

VOCAB, BOS, EOS, PAD = 32, 1, 2, 0
GROUPS, GROUP_SIZE = 2, 4


def _config(classifier: bool = False) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=not classifier,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        **({"num_labels": 1} if classifier else {}),
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import GenerationConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    policy = tmp_path_factory.mktemp("policy")
    LlamaForCausalLM(_config()).save_pretrained(str(policy))
    save_tokenizer(policy)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD).save_pretrained(
        str(policy)
    )
    critic = tmp_path_factory.mktemp("critic")
    LlamaForSequenceClassification(_config(classifier=True)).save_pretrained(str(critic))
    save_tokenizer(critic)
    return policy, critic


def _spec(policy: Path, critic: Path | None = None, **algorithm: Any) -> RLHFJobSpec:
    algo = {
        "name": "ppo" if critic else "grpo",
        "promptsPerIteration": GROUPS,
        "samplesPerPrompt": GROUP_SIZE,
        "learningRate": 1e-3,
        "microBatchSize": 3,
        "miniBatches": 2,
        "klCoef": 0.01,
        **algorithm,
    }
    models: dict[str, Any] = {"policy": {"path": str(policy)}}
    if critic is not None:
        models["critic"] = {"path": str(critic)}
    return RLHFJobSpec.model_validate(
        {"algorithm": algo, "models": models, "dataset": {"path": "unused.jsonl"}}
    )


def _samples(seed: int) -> list[tuple[list[int], list[int], float]]:
    """(prompt ids, response ids, reward): per group, the first response is the rewarded one."""
    rng = random.Random(seed)
    out = []
    for _ in range(GROUPS):
        prompt = [BOS, 14, *[rng.randrange(4, 14) for _ in range(rng.randrange(2, 6))], 15]
        for k in range(GROUP_SIZE):
            response = [rng.randrange(4, 14) for _ in range(rng.randrange(2, 7))] + [EOS]
            out.append((prompt, response, 1.0 if k == 0 else 0.0))
    return out


def _experiences(
    samples: list[tuple[list[int], list[int], float]], behaviour: Any, reference: Any, it: int
) -> list[Experience]:
    """Experiences whose rollout log-probs come from ``behaviour`` (on-policy)."""
    batch = pad_batch([s[0] for s in samples], [s[1] for s in samples], PAD, EOS)
    with torch.no_grad():
        old = response_logprobs(behaviour, batch).tolist()
        ref = response_logprobs(reference, batch).tolist()
    exps = []
    for i, (prompt, response, reward) in enumerate(samples):
        n = len(response)
        group = i // GROUP_SIZE
        rollout = Rollout(
            iteration=it,
            sample_id=f"it{it}/p{group}/{i % GROUP_SIZE}",
            prompt_id=f"p{group}",
            group_id=f"g{group}",
            sample_index=i % GROUP_SIZE,
            prompt="",
            prompt_token_ids=prompt,
            token_ids=response,
            logprobs=old[i][:n],
            text="",
            finish_reason="stop",
            weight_version=it - 1,
            worker="test",
        )
        exps.append(Experience(rollout=rollout, reward=reward, ref_logprobs=ref[i][:n]))
    return exps


def _sequence_logprobs(model: Any, samples: list[tuple[list[int], list[int], float]]) -> Any:
    batch = pad_batch([s[0] for s in samples], [s[1] for s in samples], PAD, EOS)
    with torch.no_grad():
        return response_logprobs(model, batch).sum(dim=1)


def _params(trainer: PolicyTrainer) -> dict[str, torch.Tensor]:
    out = {f"policy.{k}": v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    if trainer.critic is not None:
        critic = trainer.critic.state_dict()
        out.update({f"critic.{k}": v.detach().clone() for k, v in critic.items()})
    return out


def test_grpo_raises_the_rewarded_responses_logprob(model_dirs: tuple[Path, Path]) -> None:
    policy_dir, _ = model_dirs
    trainer = PolicyTrainer(_spec(policy_dir), policy_dir, device=torch.device("cpu"))
    reference = load_causal_lm(policy_dir, torch.device("cpu"))
    samples = _samples(seed=0)
    before = _sequence_logprobs(trainer.policy, samples)
    for it in range(1, 4):
        stats = trainer.train_iteration(_experiences(samples, trainer.policy, reference, it))
        assert stats.optimizer_steps == 2 and stats.samples == GROUPS * GROUP_SIZE
        assert stats.reward_mean == pytest.approx(0.25)
    change = _sequence_logprobs(trainer.policy, samples) - before
    rewarded = change[::GROUP_SIZE]
    others = torch.cat([change[g * GROUP_SIZE + 1 : (g + 1) * GROUP_SIZE] for g in range(GROUPS)])
    assert float(rewarded.min()) > 1.0, change
    assert float(rewarded.min()) > float(others.max()) + 1.0, change
    assert trainer.iteration == 3
    assert stats.kl > 0 and stats.grad_norm > 0 and stats.entropy > 0


def test_micro_batch_size_does_not_change_the_update(model_dirs: tuple[Path, Path]) -> None:
    policy_dir, _ = model_dirs
    reference = load_causal_lm(policy_dir, torch.device("cpu"))
    exps = _experiences(_samples(seed=1), reference, reference, 1)
    results = []
    for micro in (1, 8):
        trainer = PolicyTrainer(
            _spec(policy_dir, microBatchSize=micro), policy_dir, device=torch.device("cpu")
        )
        stats = trainer.train_iteration(list(reversed(exps)) if micro == 1 else exps)
        results.append((_params(trainer), stats))
    (a, stats_a), (b, stats_b) = results
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert stats_a.policy_loss == pytest.approx(stats_b.policy_loss, abs=1e-6)
    initial = load_causal_lm(policy_dir, torch.device("cpu")).state_dict()
    assert max(float((a[f"policy.{k}"] - v).abs().max()) for k, v in initial.items()) > 1e-4


def test_ppo_trains_policy_and_critic(model_dirs: tuple[Path, Path]) -> None:
    policy_dir, critic_dir = model_dirs
    trainer = PolicyTrainer(
        _spec(policy_dir, critic_dir), policy_dir, critic_dir, device=torch.device("cpu")
    )
    reference = load_causal_lm(policy_dir, torch.device("cpu"))
    samples = _samples(seed=2)
    start = _params(trainer)
    losses = []
    for it in range(1, 6):
        stats = trainer.train_iteration(_experiences(samples, trainer.policy, reference, it))
        assert stats.value_loss is not None and torch.isfinite(torch.tensor(stats.value_loss))
        losses.append(stats.value_loss)
    end = _params(trainer)
    for model in ("policy", "critic"):
        names = [k for k in start if k.startswith(model + ".")]
        assert max(float((end[k] - start[k]).abs().max()) for k in names) > 1e-4, model
    # The critic learns the returns: its loss falls over iterations on the same samples.
    assert losses[-1] < 0.5 * losses[0], losses


def test_export_weights_loads_in_transformers(
    model_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy_dir, _ = model_dirs
    trainer = PolicyTrainer(_spec(policy_dir), policy_dir, device=torch.device("cpu"))
    reference = load_causal_lm(policy_dir, torch.device("cpu"))
    trainer.train_iteration(_experiences(_samples(seed=3), reference, reference, 1))
    out = trainer.export_weights(tmp_path / "weights" / "v1")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= names
    assert [p.name for p in out.parent.iterdir()] == ["v1"]  # no temp dir left behind
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["use_cache"] is True
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    live = trainer.policy.state_dict()
    for name, tensor in loaded.state_dict().items():
        # Exported in bf16 (the ModelRef default): equal to the live weights rounded.
        assert torch.equal(tensor, live[name].to(torch.bfloat16).float()), name
    assert AutoTokenizer.from_pretrained(str(out))("S1=").input_ids[0] == BOS
    fp32 = trainer.export_weights(tmp_path / "weights" / "v1", dtype=torch.float32)  # replaces
    reloaded = AutoModelForCausalLM.from_pretrained(str(fp32), dtype=torch.float32).state_dict()
    assert all(torch.equal(reloaded[k], live[k]) for k in reloaded)


class _Broken:
    def save_state(self, out_dir: Path) -> None:
        (out_dir / "partial").write_text("x")
        raise RuntimeError("disk full")

    def load_state(self, state_dir: Path) -> int:
        raise AssertionError("unreachable")


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_checkpoint_keep_and_exact_resume(
    model_dirs: tuple[Path, Path], tmp_path: Path, algorithm: str
) -> None:
    policy_dir, critic_dir = model_dirs
    critic = critic_dir if algorithm == "ppo" else None
    spec = _spec(policy_dir, critic)
    reference = load_causal_lm(policy_dir, torch.device("cpu"))
    batches = {
        it: _experiences(_samples(seed=10 + it), reference, reference, it) for it in (1, 2, 3)
    }

    def fresh() -> PolicyTrainer:
        return PolicyTrainer(spec, policy_dir, critic, device=torch.device("cpu"))

    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    assert store.latest() is None
    with pytest.raises(FileNotFoundError):
        store.restore(fresh())
    uninterrupted = fresh()
    uninterrupted.train_iteration(batches[1])
    store.save(1, uninterrupted)
    uninterrupted.train_iteration(batches[2])
    store.save(2, uninterrupted)
    expected_stats = uninterrupted.train_iteration(batches[3])
    store.save(3, uninterrupted)
    assert store.iterations() == [2, 3] and store.latest() == 3
    assert (store.path(3) / "policy" / "model.safetensors").is_file()
    assert (store.path(3) / "critic").is_dir() == (algorithm == "ppo")

    with pytest.raises(RuntimeError, match="disk full"):
        store.save(4, _Broken())
    assert store.latest() == 3
    assert sorted(p.name for p in store.root.iterdir()) == ["iter-000002", "iter-000003"]

    resumed = fresh()
    assert store.restore(resumed, iteration=2) == 2 and resumed.iteration == 2
    stats = resumed.train_iteration(batches[3])
    expected = _params(uninterrupted)
    got = _params(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert stats.policy_loss == expected_stats.policy_loss
    assert stats.value_loss == expected_stats.value_loss

    # Without the restore the same iteration gives different weights: the test can fail.
    unrestored = fresh()
    unrestored.train_iteration(batches[3])
    assert not all(torch.equal(_params(unrestored)[k], expected[k]) for k in expected)
