"""The distiller's fast paths compute what the plain one did: the teacher's hidden states
cached once give the policy's logits, the draft's logits only at response tokens are the
full pass's, and the first loss equals the per-batch computation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from family_models import family_model
from rlhfspec_workers.distill.layers import draft_from_policy
from rlhfspec_workers.distill.rollouts import DraftExample
from rlhfspec_workers.distill.train import (
    Teacher,
    distill,
    kl_loss,
    native_bf16,
    student_logits,
)
from rlhfspec_workers.torch_models import load_causal_lm, pad_batch, response_logits


def _examples(count: int, seed: int = 0, vocab: int = 30) -> list[DraftExample]:
    rng = random.Random(seed)
    return [
        DraftExample(
            [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 9))],
            [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 12))],
        )
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def policy(tiny_kit: Path) -> Any:
    torch.manual_seed(0)
    return load_causal_lm(tiny_kit / "policy", torch.device("cpu")).float()


def test_cached_teacher_and_response_only_logits_equal_the_full_pass(policy: Any) -> None:
    examples = _examples(11)
    teacher = Teacher(policy, examples, batch_size=4, bf16=False)
    assert teacher.head is not None and len(teacher.hidden) == len(examples)
    draft = draft_from_policy(policy, 2)
    for indices in ([0, 5, 9], [10], list(range(11))):
        chosen = [examples[i] for i in indices]
        batch = pad_batch([e.prompt_ids for e in chosen], [e.response_ids for e in chosen])
        real = batch.response_mask > 0
        with torch.no_grad():
            full = response_logits(policy, batch)[real]
            drafted = student_logits(draft, batch)
            expected = response_logits(draft, batch)[real]
        assert full.shape[0] == sum(len(e.response_ids) for e in chosen)
        torch.testing.assert_close(teacher.logits(indices), full, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(drafted, expected, rtol=1e-4, atol=1e-4)


def test_first_loss_is_the_per_batch_kl_and_training_lowers_it(policy: Any) -> None:
    examples = _examples(24, seed=1)
    draft = draft_from_policy(policy, 1)
    # What the old loop computed on its first batch: the same draws, the full [B, T, V] pass.
    first = random.Random(3).sample(list(examples), 8)
    batch = pad_batch([e.prompt_ids for e in first], [e.response_ids for e in first])
    with torch.no_grad():
        expected = float(
            kl_loss(
                response_logits(policy, batch), response_logits(draft, batch), batch.response_mask
            )
        )
    stats = distill(
        policy, draft, examples, steps=12, batch_size=8, learning_rate=1e-3, seed=3, bf16=False
    )
    assert stats.first_loss == pytest.approx(expected, rel=1e-4)
    assert stats.last_loss < stats.first_loss
    assert 0 < stats.teacher_seconds <= stats.seconds


def test_bf16_only_on_a_cpu() -> None:
    assert native_bf16(torch.device("cuda")) is False
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize("train_head", [False, True])
def test_the_head_learns_only_when_asked(policy: Any, train_head: bool) -> None:
    draft = draft_from_policy(policy, 1, train_head=train_head)
    head = draft.lm_head.weight.detach().clone()
    block = draft.model.layers[0].mlp.down_proj.weight.detach().clone()
    distill(policy, draft, _examples(16, seed=4), steps=3, batch_size=8, learning_rate=1e-2)
    assert not torch.equal(draft.model.layers[0].mlp.down_proj.weight, block)
    assert torch.equal(draft.lm_head.weight, head) is not train_head
    # Tied: the embedding is the head, trained or frozen with it.
    assert draft.model.embed_tokens.weight.data_ptr() == draft.lm_head.weight.data_ptr()


@pytest.mark.parametrize("config_class", ["Qwen2Config", "Qwen3Config", "MistralConfig"])
def test_a_draft_from_a_qwen_or_mistral_policy_is_its_layers_and_runs_in_the_proposer(
    config_class: str, tmp_path: Path
) -> None:
    """Beyond Llama: the draft is the policy's own class and blocks (all of them: the
    policy's logits exactly, biases and query/key norms included), its cached teacher is
    exact, and the saved draft runs in the proposer's draft forward logit for logit."""
    from rlhfspec_workers.drafters.llama_forward import LlamaDraftModel

    policy = family_model(
        config_class, vocab_size=30, num_hidden_layers=3, max_position_embeddings=128
    )
    ids = torch.randint(1, 30, (2, 9))
    whole = draft_from_policy(policy, 3).eval()
    assert type(whole) is type(policy)
    with torch.no_grad():
        torch.testing.assert_close(whole(ids).logits, policy(ids).logits)
    draft = draft_from_policy(policy, 2).eval()
    assert draft.config.rlhfspec_draft_layers == [0, 2]
    for mine, theirs in zip(
        draft.model.layers[1].parameters(), policy.model.layers[2].parameters(), strict=True
    ):
        assert torch.equal(mine, theirs)
    examples = _examples(5)
    teacher = Teacher(policy, examples, batch_size=2, bf16=False)
    assert teacher.head is not None  # the cached (trunk, head) path, exact for the family
    batch = pad_batch([e.prompt_ids for e in examples], [e.response_ids for e in examples])
    with torch.no_grad():
        full = response_logits(policy, batch)[batch.response_mask > 0]
    torch.testing.assert_close(teacher.logits(list(range(5))), full, rtol=1e-4, atol=1e-4)
    draft.save_pretrained(tmp_path)
    forward = LlamaDraftModel(tmp_path, max_slots=2, max_len=32, dtype=torch.float32)
    lengths = torch.tensor([9, 9])
    got = forward.forward(ids, torch.arange(2), torch.zeros(2, dtype=torch.long), lengths)
    with torch.no_grad():
        torch.testing.assert_close(got, draft(ids).logits[:, -1], rtol=1e-4, atol=1e-4)
