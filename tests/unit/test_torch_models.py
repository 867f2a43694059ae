"""torch_models on random tiny Llamas: log-probs equal HF's own forward, padding changes
nothing, the value model reads the classifier head at every position, masks stop at EOS."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhfspec_workers import torch_models as tm
from rlhfspec_workers.trainer import core_algos as ca

VOCAB, EOS, PAD = 32, 2, 0


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
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        **({"num_labels": 1} if classifier else {}),
    )


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("policy")
    model = LlamaForCausalLM(_config())
    # Wider init than the default: peaked, distinct next-token distributions.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("reward")
    LlamaForSequenceClassification(_config(classifier=True)).save_pretrained(str(out))
    return out


PROMPTS = [[1, 14, 7, 6, 15], [1, 14, 9, 15], [1, 14, 5, 5, 5, 8, 15]]
RESPONSES = [[6, 7, EOS], [9, 0, 9, 9, EOS], [5]]  # a sampled pad mid-answer; one unfinished


def test_pad_batch_layout_and_masks() -> None:
    batch = tm.pad_batch(PROMPTS, [*RESPONSES[:2], [5, EOS, 7]], pad_id=PAD, eos_id=EOS)
    assert batch.input_ids.shape == (3, 10)
    assert batch.response_ids.shape == (3, 5)
    # Row 3: tokens after the first EOS are not part of the response.
    assert batch.response_mask.tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert batch.predict_index[0, :3].tolist() == [4, 5, 6]
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES[:2], strict=False)):
        assert batch.input_ids[i, : len(p) + len(r)].tolist() == p + r
    no_eos = tm.pad_batch(PROMPTS, [*RESPONSES[:2], [5, EOS, 7]], pad_id=PAD)
    assert no_eos.response_mask[2].tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="at least one token"):
        tm.pad_batch([[]], [[3]])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_equal_hf_forward_per_sequence(
    policy_dir: Path, temperature: float
) -> None:
    model = tm.load_causal_lm(policy_dir, torch.device("cpu"))
    batch = tm.pad_batch(PROMPTS, RESPONSES, pad_id=PAD, eos_id=EOS)
    got = tm.response_logprobs(model, batch, temperature)
    assert got.shape == batch.response_ids.shape
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0].float() / temperature
            logp = torch.log_softmax(logits, dim=-1)
            expected = [float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(r)]
            assert got[i, : len(r)].tolist() == pytest.approx(expected, abs=1e-5)
            assert got[i, len(r) :].abs().sum() == 0  # padding contributes nothing
    # Not a constant: the distribution is far from uniform and depends on the context.
    assert float(got[0, 0]) != pytest.approx(float(got[1, 0]), abs=1e-3)
    assert float(got[0, 0]) != pytest.approx(-math.log(VOCAB), abs=1e-2)


class _NoLogitsToKeep(torch.nn.Module):
    """The same model behind a forward without ``logits_to_keep``: every position's logits."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.widths: list[int] = []

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.inner(input_ids=input_ids)
        self.widths.append(out.logits.shape[1])
        return out


def test_lm_head_skips_prompt_positions_and_agrees_with_full_logits(policy_dir: Path) -> None:
    model = tm.load_causal_lm(policy_dir, torch.device("cpu"))
    batch = tm.pad_batch(PROMPTS, RESPONSES, pad_id=PAD, eos_id=EOS)
    widths: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: widths.append(o.shape[1]))
    try:
        cut, _ = tm.response_logprobs_and_entropy(model, batch, 0.7)
    finally:
        hook.remove()
    # Shortest prompt: 4 tokens, so the head starts at position 3 of the 9-wide batch.
    assert widths == [batch.input_ids.shape[1] - 3] == [6]
    full_model = _NoLogitsToKeep(model)
    full, _ = tm.response_logprobs_and_entropy(full_model, batch, 0.7)
    assert full_model.widths == [batch.input_ids.shape[1]]
    assert torch.allclose(cut, full, atol=1e-6, rtol=0)
    assert float(cut.abs().sum()) > 1.0


def test_entropy_matches_distribution_and_gradients_flow(policy_dir: Path) -> None:
    model = tm.load_causal_lm(policy_dir, torch.device("cpu"), trainable=True)
    batch = tm.pad_batch(PROMPTS, RESPONSES, pad_id=PAD, eos_id=EOS)
    logp, entropy = tm.response_logprobs_and_entropy(model, batch, 1.0)
    assert entropy is not None
    entropy = entropy.detach()
    assert float(entropy[0, 0]) > 0 and float(entropy.max()) <= math.log(VOCAB) + 1e-5
    assert entropy[2, 1:].abs().sum() == 0
    ca.masked_mean(logp, batch.response_mask).backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_value_model_reads_head_at_every_position(reward_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    critic = tm.load_value_model(reward_dir, torch.device("cpu"))
    reference = AutoModelForSequenceClassification.from_pretrained(
        str(reward_dir), dtype=torch.float32
    )
    batch = tm.pad_batch(PROMPTS, RESPONSES, pad_id=PAD, eos_id=EOS)
    with torch.no_grad():
        values = tm.response_values(critic, batch)
        assert values.shape == batch.response_ids.shape
        for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
            # HF pools the last token: the value after the whole prefix before token j is the
            # classifier's score of that prefix.
            for j in range(len(r)):
                if (p + r)[len(p) + j - 1] == PAD:
                    continue  # HF pools the last non-pad token; a sampled pad would move it
                prefix = torch.tensor([(p + r)[: len(p) + j]])
                pooled = float(reference(input_ids=prefix).logits[0, 0])
                assert float(values[i, j]) == pytest.approx(pooled, abs=1e-5)
        lengths = batch.sequence_lengths
        scores = tm.last_token_scores(critic, batch.input_ids, lengths)
        pooled_full = [
            float(reference(input_ids=torch.tensor([p + r])).logits[0, 0])
            for p, r in zip(PROMPTS, RESPONSES, strict=True)
        ]
    assert scores.tolist() == pytest.approx(pooled_full, abs=1e-5)


def test_grouped_advantages_match_contiguous_grpo_and_handle_odd_groups() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    contiguous = ca.grpo_advantages(rewards, group_size=4)
    shuffled = torch.tensor([3, 6, 0, 5, 1, 7, 2, 4])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    by_group = ca.grpo_advantages_by_group(rewards[shuffled], groups[shuffled])
    assert by_group.tolist() == pytest.approx(contiguous[shuffled].tolist(), abs=1e-6)
    # A group of one (its siblings were dropped) and a group of three.
    odd = ca.grpo_advantages_by_group(
        torch.tensor([1.0, 2.0, 0.0, 1.0]), torch.tensor([0, 1, 1, 1])
    )
    assert odd[0] == 0.0
    assert odd[1:].tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-5)
