"""PolicyTrainer and CheckpointStore on random tiny Llamas: GRPO and RLOO raise the rewarded
response's log-prob, PPO trains a critic, micro-batching does not change the update, exports
load in transformers, and a restored checkpoint continues bit-exactly."""

from __future__ import annotations

import json
import math
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
from rlhfspec_workers.trainer.worker import trainer_threads

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


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_algorithms_raise_the_rewarded_responses_logprob(
    model_dirs: tuple[Path, Path], algorithm: str
) -> None:
    policy_dir, _ = model_dirs
    spec = _spec(policy_dir, name=algorithm)
    trainer = PolicyTrainer(spec, policy_dir, device=torch.device("cpu"))
    assert trainer.algorithm.name.value == algorithm
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


def _shifted(exps: list[Experience], shift: Any) -> list[Experience]:
    """The same experiences with rollout log-probs moved by ``shift(i, j)`` at token j of i."""
    out = []
    for i, e in enumerate(exps):
        logprobs = [lp + shift(i, j) for j, lp in enumerate(e.rollout.logprobs)]
        rollout = e.rollout.model_copy(update={"logprobs": logprobs})
        out.append(e.model_copy(update={"rollout": rollout}))
    return out


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_the_update_does_not_depend_on_the_engines_logprobs(
    model_dirs: tuple[Path, Path], algorithm: str
) -> None:
    """Old log-probs are the trainer's own forward at the pre-update weights: rollout
    log-probs off by an engine's numerics (here: up to 0.5 per token) change no weight."""
    policy_dir, critic_dir = model_dirs
    critic = critic_dir if algorithm == "ppo" else None
    reference = load_causal_lm(policy_dir, torch.device("cpu"))
    exact = _experiences(_samples(seed=4), reference, reference, 1)
    noisy = _shifted(exact, lambda i, j: 0.5 * math.sin(3 * i + j))
    results = []
    for exps in (exact, noisy):
        trainer = PolicyTrainer(_spec(policy_dir, critic), policy_dir, critic, torch.device("cpu"))
        stats = trainer.train_iteration(exps)
        results.append((_params(trainer), stats))
    (a, stats_a), (b, stats_b) = results
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert stats_a.policy_loss == stats_b.policy_loss
    assert stats_a.clip_fraction == stats_b.clip_fraction
    assert stats_a.logprob_mismatch_max < 1e-5 < 0.4 < stats_b.logprob_mismatch_max
    initial = load_causal_lm(policy_dir, torch.device("cpu")).state_dict()
    assert max(float((a[f"policy.{k}"] - v).abs().max()) for k, v in initial.items()) > 1e-4


def test_one_step_ratio_is_exactly_one(model_dirs: tuple[Path, Path]) -> None:
    """A single optimizer step reads its old log-probs off its own forward: nothing clips and
    the surrogate is exactly -mean(advantage) over tokens, even against a rollout that is far
    off (which, used as the old log-probs, would clip most tokens)."""
    policy_dir, _ = model_dirs
    reference = load_causal_lm(policy_dir, torch.device("cpu"))
    exps = _shifted(_experiences(_samples(seed=5), reference, reference, 1), lambda i, j: 1.0)
    trainer = PolicyTrainer(
        _spec(policy_dir, miniBatches=1), policy_dir, device=torch.device("cpu")
    )
    stats = trainer.train_iteration(exps)
    assert stats.clip_fraction == 0.0
    rewards = torch.tensor([e.reward for e in exps]).view(GROUPS, GROUP_SIZE)
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    tokens = torch.tensor([len(e.rollout.token_ids) for e in exps], dtype=torch.float32)
    expected = -float((advantages.flatten() * tokens).sum() / tokens.sum())
    assert stats.policy_loss == pytest.approx(expected, abs=1e-6)
    assert stats.logprob_mismatch_mean == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("algorithm", "mini_batches"), [("grpo", 2), ("grpo", 3), ("ppo", 2)])
def test_old_logprob_pass_covers_only_later_steps(
    model_dirs: tuple[Path, Path], algorithm: str, mini_batches: int
) -> None:
    """GRPO: the no-grad pass runs over the rows of steps 2..M only ((M-1)/M of a forward);
    PPO needs every row's before its rewards, so it covers all of them."""
    policy_dir, critic_dir = model_dirs
    critic = critic_dir if algorithm == "ppo" else None
    reference = load_causal_lm(policy_dir, torch.device("cpu"))
    exps = _experiences(_samples(seed=6), reference, reference, 1)
    spec = _spec(policy_dir, critic, miniBatches=mini_batches, microBatchSize=8)
    trainer = PolicyTrainer(spec, policy_dir, critic, device=torch.device("cpu"))
    rows = {True: 0, False: 0}

    def count(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        rows[torch.is_grad_enabled()] += int(kwargs["input_ids"].shape[0])

    hook = trainer.policy.register_forward_hook(count, with_kwargs=True)
    try:
        trainer.train_iteration(exps)
    finally:
        hook.remove()
    total = GROUPS * GROUP_SIZE
    first_step = -(-total // mini_batches)  # split_even: the first step is the largest
    assert rows[True] == total
    assert rows[False] == (total if algorithm == "ppo" else total - first_step)


def test_mismatch_metrics_report_a_known_perturbation(model_dirs: tuple[Path, Path]) -> None:
    """Rollout log-probs = the trainer's + 0.05 per token, one token - 0.3: the metrics give
    that mean, that max and the k3 KL of those shifts."""
    policy_dir, _ = model_dirs
    reference = load_causal_lm(policy_dir, torch.device("cpu"))
    exact = _experiences(_samples(seed=7), reference, reference, 1)
    shifts = [[0.05] * len(e.rollout.token_ids) for e in exact]
    shifts[3][1] = -0.3
    exps = _shifted(exact, lambda i, j: shifts[i][j])
    trainer = PolicyTrainer(_spec(policy_dir), policy_dir, device=torch.device("cpu"))
    stats = trainer.train_iteration(exps)
    flat = [d for row in shifts for d in row]
    assert stats.logprob_mismatch_mean == pytest.approx(sum(map(abs, flat)) / len(flat), abs=1e-6)
    assert stats.logprob_mismatch_max == pytest.approx(0.3, abs=1e-6)
    # k3 of KL(rollout || trainer): log ratio trainer - rollout = -d per token.
    kl = sum(math.exp(-d) + d - 1 for d in flat) / len(flat)
    assert stats.rollout_kl == pytest.approx(kl, abs=1e-6)


def test_trainer_threads_follow_the_cpu_request() -> None:
    assert trainer_threads("1", available=16) == 1
    assert trainer_threads("4", available=16) == 4
    assert trainer_threads("4", available=2) == 2
    assert trainer_threads("500m", available=8) == 1
    assert trainer_threads("2500m", available=8) == 2


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
