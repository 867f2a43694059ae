"""The algorithm registry and RLOO's leave-one-out advantages (pure tensors, no model)."""

from __future__ import annotations

import pytest
import torch

from rlhfspec_api.manifest import ManifestError, parse_rlhfjob
from rlhfspec_api.spec import AlgorithmName, AlgorithmSpec
from rlhfspec_workers.trainer import algorithms
from rlhfspec_workers.trainer.algorithms import AdvantageInputs, RLAlgorithm
from rlhfspec_workers.trainer.algorithms.rloo import rloo_advantages_by_group


def test_every_algorithm_name_has_one_registered_module() -> None:
    registry = algorithms.registered()
    assert set(registry) == set(AlgorithmName)
    for name, entry in registry.items():
        assert entry.name is name
    with pytest.raises(ValueError, match="registered twice"):
        algorithms.register(registry[AlgorithmName.RLOO])


def test_rloo_baseline_is_the_mean_of_the_other_samples() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0, 2.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    got = rloo_advantages_by_group(rewards, groups)
    expected = []
    for i in range(rewards.numel()):
        others = [
            float(rewards[j]) for j in range(rewards.numel()) if j != i and groups[j] == groups[i]
        ]
        expected.append(float(rewards[i]) - sum(others) / len(others) if others else 0.0)
    assert got.tolist() == pytest.approx(expected)
    # A group of k: k/(k-1) times the mean-centred reward, and the advantages sum to 0.
    assert got[:4].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert float(got[:4].sum()) == pytest.approx(0.0, abs=1e-6)
    assert float(got[6]) == 0.0  # a group of one has no baseline


def test_rloo_does_not_depend_on_sample_order_and_ignores_scale_of_std() -> None:
    rewards = torch.tensor([0.0, 10.0, 0.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    got = rloo_advantages_by_group(rewards, groups)
    assert rloo_advantages_by_group(rewards[perm], groups[perm]).tolist() == pytest.approx(
        got[perm].tolist()
    )
    # Unlike GRPO, no std scaling: group 0's spread is 10x group 1's, and so are its advantages.
    assert float(got[1]) == pytest.approx(10.0 * float(got[3]))


def test_rloo_entry_broadcasts_over_the_response_and_keeps_kl_in_the_loss() -> None:
    entry: RLAlgorithm = algorithms.get(AlgorithmName.RLOO)
    assert entry.kl_in_loss and not entry.needs_all_old_logprobs
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    zeros = torch.zeros_like(mask)
    out = entry.advantages(
        AdvantageInputs(
            rewards=torch.tensor([1.0, 0.0]),
            group_index=torch.tensor([0, 0]),
            mask=mask,
            old_logprobs=zeros,
            ref_logprobs=zeros,
            old_values=None,
            algo=AlgorithmSpec(name=AlgorithmName.RLOO, samples_per_prompt=2),
        )
    )
    assert out.advantages.tolist() == [[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]
    assert out.returns is None


def test_rloo_needs_two_samples_per_prompt_like_grpo() -> None:
    manifest = {
        "apiVersion": "rlhfspec.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": "rloo"},
        "spec": {
            "algorithm": {"name": "rloo", "samplesPerPrompt": 1, "microBatchSize": 8},
            "models": {"policy": {"path": "tiny://policy"}},
            "dataset": {"path": "tiny://dataset/train.jsonl"},
        },
    }
    with pytest.raises(ManifestError) as refused:
        parse_rlhfjob(manifest)
    assert [e.path for e in refused.value.errors] == ["spec.algorithm.samplesPerPrompt"]
    manifest["spec"]["algorithm"]["samplesPerPrompt"] = 4  # type: ignore[index]
    assert not parse_rlhfjob(manifest).spec.algorithm.needs_critic
