"""The cost table's cache key (``generation.cost_cache.model_id``) changes with what changes a
step's cost: the model's shape and dtype, the drafters, and the engine's step path (vLLM's
version, the fixes applied to it, ``STEP_PATH_VERSION``); and not with weight values."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rlhfspec_workers.generation import cost_cache


def engine(model: Path, *, dtype: str = "float32", fixes: tuple[str, ...] = ()) -> Any:
    return SimpleNamespace(
        engine=SimpleNamespace(model_config=SimpleNamespace(model=str(model), dtype=dtype)),
        spec=SimpleNamespace(speculative=SimpleNamespace(drafters=[])),
        drafters={},
        vllm_fixes=list(fixes),
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 128)
    return tmp_path


def test_the_key_follows_the_step_path_not_the_weights(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = cost_cache.model_id(engine(model, fixes=("expand_kernel",)))
    assert base == cost_cache.model_id(engine(model, fixes=("expand_kernel",)))
    # Same sizes, other values (a weight sync): the same table.
    (model / "model.safetensors").write_bytes(b"\1" * 128)
    assert cost_cache.model_id(engine(model, fixes=("expand_kernel",))) == base
    # A fix that changes what a step does, the dtype, or this project's step path: another.
    fixed = engine(model, fixes=("expand_kernel", "plain_sampler_when_undrafted"))
    assert cost_cache.model_id(fixed) != base
    assert cost_cache.model_id(engine(model, dtype="bfloat16", fixes=("expand_kernel",))) != base
    monkeypatch.setattr(cost_cache, "STEP_PATH_VERSION", cost_cache.STEP_PATH_VERSION + 1)
    assert cost_cache.model_id(engine(model, fixes=("expand_kernel",))) != base
    monkeypatch.undo()
    monkeypatch.setattr(cost_cache, "_vllm_version", lambda: "vllm 9.9")
    assert cost_cache.model_id(engine(model, fixes=("expand_kernel",))) != base
