"""Checkpoints on the shared claim load without running code (issue #17, finding 4).

Every pod of a job mounts the claim read-write and ``storage.claimName`` may name a claim other
jobs share, so a planted ``optimizer.pt`` must not execute when the trainer resumes. What
``save_state`` writes (optimizer and RNG states) must still load under that restriction.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from rlhfspec_workers.trainer.state_io import UnsafeCheckpointError, load_tensors


class _Planted:
    """Unpickling this calls ``os.system``: what a hostile pod would write to the claim."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    planted = tmp_path / "optimizer.pt"
    torch.save({"policy": _Planted(marker)}, planted)
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer\.pt: refused to load"):
        load_tensors(planted)
    assert not marker.exists()


def test_what_save_state_writes_loads_back_with_weights_only(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    shuffle = torch.Generator().manual_seed(7)
    torch.save({"policy": optimizer.state_dict()}, tmp_path / "optimizer.pt")
    rng: dict[str, object] = {
        "shuffle": shuffle.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
    }
    torch.save(rng, tmp_path / "rng.pt")

    restored = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    restored.load_state_dict(load_tensors(tmp_path / "optimizer.pt")["policy"])
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    loaded = load_tensors(tmp_path / "rng.pt")
    assert torch.equal(loaded["shuffle"], shuffle.get_state())
    random.setstate(loaded["python"])  # the tuple Python's RNG accepts, as written
