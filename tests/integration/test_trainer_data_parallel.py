"""Data-parallel training (two gloo processes on CPU) gives the single-process update.

PolicyTrainer splits each mini-batch across ranks and all-reduces token-weighted gradients
(PPO: also the old log-probs each rank computed for its own rows, which every row's token
rewards need); if the weighting or the reduction were wrong, two ranks would take a different
step than one, or report different rollout-vs-trainer mismatch metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.messages import Experience, Rollout
from rlhfspec_workers.torch_models import load_causal_lm, pad_batch, response_logprobs
from rlhfspec_workers.trainer.policy_trainer import PolicyTrainer

WORLD = 2


def _spec(policy: Path, algorithm: str) -> RLHFJobSpec:
    models: dict[str, Any] = {"policy": {"path": str(policy)}}
    if algorithm == "ppo":
        models["critic"] = {"path": str(policy.parent / "critic")}
    return RLHFJobSpec.model_validate(
        {
            "algorithm": {
                "name": algorithm,
                "promptsPerIteration": 3,
                "samplesPerPrompt": 3,
                "microBatchSize": 2,
                "miniBatches": 2,
                "learningRate": 1e-3,
            },
            "models": models,
            "dataset": {"path": "unused.jsonl"},
        }
    )


def _trainer(policy: Path, algorithm: str) -> PolicyTrainer:
    critic = policy.parent / "critic" if algorithm == "ppo" else None
    return PolicyTrainer(_spec(policy, algorithm), policy, critic, device=torch.device("cpu"))


def _policy_dir(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(str(root / "policy"))
    config.num_labels = 1  # ppo's critic
    LlamaForSequenceClassification(config).save_pretrained(str(root / "critic"))
    return root / "policy"


def _experiences(policy_dir: Path) -> list[Experience]:
    model = load_causal_lm(policy_dir, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    prompts, responses = [], []
    for _ in range(9):  # 9 samples: ranks get unequal shares, micro-batch counts differ
        prompts.append(
            [
                1,
                *torch.randint(
                    4, 14, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen
                ).tolist(),
            ]
        )
        n = int(torch.randint(1, 7, (1,), generator=gen))
        responses.append([*torch.randint(4, 14, (n,), generator=gen).tolist(), 2])
    with torch.no_grad():
        logp = response_logprobs(model, pad_batch(prompts, responses, 0, 2)).tolist()
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        # The engine's log-probs off by 0.01 * i: the mismatch metrics must see it on every
        # rank (max 0.08: sample 8 lives on one rank only).
        engine = [lp + 0.01 * i for lp in logp[i][: len(r)]]
        rollout = Rollout(
            iteration=1,
            sample_id=f"s{i}",
            prompt_id=f"p{i // 3}",
            group_id=f"p{i // 3}",
            sample_index=i % 3,
            prompt="",
            prompt_token_ids=p,
            token_ids=r,
            logprobs=engine,
            text="",
            finish_reason="stop",
            weight_version=0,
            worker="t",
        )
        out.append(
            Experience(
                rollout=rollout, reward=float(i % 3 == 0) + 0.1 * i, ref_logprobs=logp[i][: len(r)]
            )
        )
    return out


def _rank_main(rank: int, root: str, algorithm: str) -> None:
    torch.set_num_threads(1)
    base = Path(root)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{base / 'store'}", rank=rank, world_size=WORLD
    )
    try:
        policy = base / "policy"
        raw = (base / "experiences.jsonl").read_text().splitlines()
        experiences = [Experience.from_bytes(line) for line in raw]
        trainer = _trainer(policy, algorithm)
        assert trainer.world_size == WORLD
        stats = trainer.train_iteration(experiences)
        state = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        torch.save({"state": state, "stats": stats.to_dict()}, base / f"rank{rank}.pt")
        # Both ranks past their last collective before either tears gloo down: a rank that
        # destroyed the group while the other's gloo threads still talked to it aborted the
        # other (SIGABRT, "terminate called without an active exception") in ~1 run of 7.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_two_ranks_take_the_single_process_step(tmp_path: Path, algorithm: str) -> None:
    policy = _policy_dir(tmp_path)
    experiences = _experiences(policy)
    (tmp_path / "experiences.jsonl").write_text(
        "\n".join(e.to_bytes().decode() for e in experiences)
    )
    single = _trainer(policy, algorithm)
    single_stats = single.train_iteration(experiences)
    expected = single.policy.state_dict()

    mp.spawn(_rank_main, args=(str(tmp_path), algorithm), nprocs=WORLD, join=True)

    results: list[Any] = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    initial = load_causal_lm(policy, torch.device("cpu")).state_dict()
    for result in results:
        diff = max(float((result["state"][k] - expected[k]).abs().max()) for k in expected)
        assert diff < 1e-5, diff
        got = result["stats"]
        assert got["policy_loss"] == pytest.approx(single_stats.policy_loss, abs=1e-5)
        for name in ("logprob_mismatch_mean", "logprob_mismatch_max", "rollout_kl"):
            assert got[name] == pytest.approx(getattr(single_stats, name), abs=1e-6), name
    assert single_stats.logprob_mismatch_max == pytest.approx(0.08, abs=1e-5)
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    assert moved > 1e-4  # the step was real, so equality above means something
