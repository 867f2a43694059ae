"""Keeping a draft fresh, without an engine: when it is due, distillation towards the trained
policy, atomic versioned writes, restart, and a drafter reloading the new weights in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_drafters import row, tiny_llama

from rlhfspec_api.generation import DraftRefreshSpec
from rlhfspec_workers.distill.train import kl_loss
from rlhfspec_workers.drafters.draft_model import DraftModelDrafter
from rlhfspec_workers.messages import Experience, Rollout
from rlhfspec_workers.torch_models import load_causal_lm, pad_batch, response_logits
from rlhfspec_workers.trainer.draft_refresh import (
    KEEP_DRAFT_VERSIONS,
    MIN_DRAFTED_TOKENS,
    DraftRefresher,
    draft_acceptance,
)

VOCAB = 96


def _experience(prompt: list[int], response: list[int], index: int) -> Experience:
    rollout = Rollout(
        iteration=1,
        sample_id=f"it1/p{index}/0",
        prompt_id=f"p{index}",
        group_id=f"p{index}",
        sample_index=0,
        prompt="",
        prompt_token_ids=prompt,
        token_ids=response,
        logprobs=[0.0] * len(response),
        text="",
        finish_reason="length",
        weight_version=0,
        worker="generation-0",
    )
    return Experience(rollout=rollout, reward=0.0, ref_logprobs=[0.0] * len(response))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 'policy' and a differently initialised 'draft' of the same shape and vocabulary."""
    root = tmp_path_factory.mktemp("refresh")
    policy = tiny_llama(root / "policy", vocab=VOCAB, layers=2, seed=1)
    draft = tiny_llama(root / "draft", vocab=VOCAB, layers=1, seed=2)
    return policy, draft


def _rollouts(count: int = 16, seed: int = 0) -> list[Experience]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        prompt = [int(t) for t in rng.integers(1, VOCAB, 6)]
        response = [int(t) for t in rng.integers(1, VOCAB, 10)]
        out.append(_experience(prompt, response, i))
    return out


def _kl(teacher: object, draft_dir: Path, experiences: list[Experience]) -> float:
    draft = load_causal_lm(draft_dir, torch.device("cpu"))
    batch = pad_batch(
        [e.rollout.prompt_token_ids for e in experiences],
        [e.rollout.token_ids for e in experiences],
    )
    with torch.no_grad():
        return float(
            kl_loss(
                response_logits(teacher, batch), response_logits(draft, batch), batch.response_mask
            )
        )


def test_due_every_nth_iteration_and_on_low_acceptance() -> None:
    every = DraftRefresher(DraftRefreshSpec(every=2), Path("d"), Path("r"), 0)
    assert [every.due(i, {}) is not None for i in (1, 2, 3, 4)] == [False, True, False, True]
    low = DraftRefresher(DraftRefreshSpec(on_acceptance_below=0.5), Path("d"), Path("r"), 0)
    stats = {"drafted:draft_model": 200.0, "accepted:draft_model": 60.0}
    assert low.due(1, stats) == "acceptance 0.300 < 0.5"
    assert low.due(1, {**stats, "accepted:draft_model": 150.0}) is None
    # Too little drafting to measure (a selector that stopped using a stale draft): refresh.
    few = {"drafted:draft_model": MIN_DRAFTED_TOKENS - 1.0, "accepted:draft_model": 30.0}
    assert draft_acceptance(few) is None
    assert low.due(1, few) is not None
    # Another drafter's counters say nothing about the draft model.
    assert low.due(1, {"drafted:suffix": 500.0, "accepted:suffix": 500.0}) is not None


def test_refresh_moves_the_draft_towards_the_trained_policy(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    policy_dir, draft_dir = models
    teacher = load_causal_lm(policy_dir, torch.device("cpu"), trainable=True)
    train, held_out = _rollouts(seed=0), _rollouts(seed=1)
    refresher = DraftRefresher(
        DraftRefreshSpec(every=1, steps=30, batch_size=8, learning_rate=1e-3),
        draft_dir,
        tmp_path / "drafts",
        pad_id=0,
    )
    refresher.restore()
    assert refresher.current.version == 0 and refresher.current.path == draft_dir
    seconds = refresher.distill(teacher, train, seed=1)
    assert seconds > 0
    assert teacher.training, "the trainer's policy is left in the mode it was in"
    written = refresher.write(1)
    assert written.version == 1 and written.path == tmp_path / "drafts" / "v1"
    assert (written.path / "config.json").is_file() and list(written.path.glob("*.safetensors"))
    assert not [p for p in written.path.parent.iterdir() if p.name.startswith(".")]
    before, after = _kl(teacher, draft_dir, held_out), _kl(teacher, written.path, held_out)
    assert after < before * 0.9, (before, after)


def test_versions_are_pruned_and_a_restart_continues_from_the_newest(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    policy_dir, draft_dir = models
    teacher = load_causal_lm(policy_dir, torch.device("cpu"))
    root = tmp_path / "drafts"
    refresher = DraftRefresher(DraftRefreshSpec(every=1, steps=1), draft_dir, root, 0)
    for iteration in range(1, KEEP_DRAFT_VERSIONS + 3):
        refresher.distill(teacher, _rollouts(count=4), seed=iteration)
        refresher.write(iteration)
    kept = sorted(p.name for p in root.iterdir())
    assert kept == [f"v{i}" for i in range(3, KEEP_DRAFT_VERSIONS + 3)]
    (root / ".v9.tmp-abc").mkdir()  # a killed write: never taken for a version
    restarted = DraftRefresher(DraftRefreshSpec(every=1), draft_dir, root, 0)
    assert restarted.restore().version == KEEP_DRAFT_VERSIONS + 2
    assert restarted.current.path == root / f"v{KEEP_DRAFT_VERSIONS + 2}"


def _context_sensitive(src: Path, dst: Path, seed: int) -> Path:
    """``src`` with its blocks' outputs scaled up: a freshly initialised tied-embedding Llama
    mostly repeats its last token; with the blocks dominating, drafts depend on the context
    (and on the cached keys and values a reload must not reuse)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weight.copy_(torch.randn_like(weight) * 2.0)
    model.save_pretrained(dst)
    return dst


def test_drafter_reloads_weights_in_place_and_forgets_stale_cache(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    policy_dir, draft_dir = models
    old = _context_sensitive(draft_dir, tmp_path / "old", seed=3)
    new = _context_sensitive(draft_dir, tmp_path / "new", seed=4)
    rng = np.random.default_rng(0)
    rows = [row(f"r{i}", [int(t) for t in rng.integers(0, VOCAB, 7 + i)]) for i in range(3)]
    drafter = DraftModelDrafter(old, max_slots=8, max_len=96, dtype=torch.float32)
    stale = drafter.propose(rows, 4)
    drafter.load_weights(new)
    reloaded = drafter.propose(rows, 4)
    fresh = DraftModelDrafter(new, max_slots=8, max_len=96, dtype=torch.float32)
    assert reloaded == fresh.propose(rows, 4)
    assert reloaded != stale  # the new weights draft differently: the reload took effect
    with pytest.raises(ValueError, match="num_hidden_layers"):
        drafter.load_weights(policy_dir)  # 2 layers into a 1-layer draft: not a reload
