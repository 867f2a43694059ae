"""Migration by KV transfer between two real vLLM engines (the MigrationConnector).

The source reads a running sample's paged KV out of its cache and aborts it; the snapshot
goes through its Redis encoding (bytes); the destination loads it through vLLM's KV connector
API instead of prefilling. The stitched greedy sample must equal the unmigrated one, and the
destination must really have used the snapshot: a corrupted snapshot changes the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rlhfspec_api.generation import GenerationSpec

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def engines(draft_engine: Callable[..., Any]) -> Iterator[tuple[Any, Any]]:
    built = [draft_engine(MAX_TOKENS, kv_migration=True) for _ in range(2)]
    yield built[0], built[1]
    for eng in built:
        eng.close()


def _prompts(kit: Path, count: int) -> list[Any]:
    import json

    from rlhfspec_workers.generation.records import PromptInput

    rows = (kit / "dataset" / "train.jsonl").read_text().splitlines()[:count]
    return [PromptInput(json.loads(r)["prompt"], f"p{i}") for i, r in enumerate(rows)]


def _sampling() -> Any:
    from rlhfspec_workers.generation.records import SamplingConfig

    return SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _drain(eng: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    while eng.running:
        for r in eng.poll():
            out[f"{r.prompt_id}/{r.sample_index}"] = r
    return out


def _through_redis_encoding(state: Any, sample_id: str) -> Any:
    from rlhfspec_workers.generation.kv_migration import KVState
    from rlhfspec_workers.messages import KVSnapshot

    raw = state.to_message(sample_id).to_bytes()
    return KVState.from_message(KVSnapshot.from_bytes(raw))


def _migrate_midway(
    source: Any, destination: Any, prompts: list[Any], *, corrupt: bool = False
) -> dict[str, tuple[list[int], list[float], int]]:
    """Run ``prompts`` (2 samples each) on the source for a few steps, then move every
    running sample to the destination with its KV. Returns what each moved sample had."""
    from rlhfspec_workers.generation.kv_migration import CPU_MIGRATION_BLOCK_SIZE

    # Whole blocks travel, of the small size a migrating CPU engine runs with (not
    # vLLM-CPU's 128): each snapshot carries under one block of positions past its context.
    assert source.kv.block_size == CPU_MIGRATION_BLOCK_SIZE
    sampling = _sampling()
    ids = {f"{p.prompt_id}/{j}": (p, j, source.submit(p, sampling, j)) for p in prompts
           for j in range(2)}  # fmt: skip
    for _ in range(4):
        assert not source.poll()  # fixed-length samples: none finishes this early
    moved: dict[str, tuple[list[int], list[float], int]] = {}
    bytes_per_token = source.kv.bytes_per_token
    for key, (p, j, request_id) in ids.items():
        state = source.export_kv(request_id)
        tokens, logprobs = source.preempt(request_id)
        assert state is not None and len(tokens) > 0
        # The newest sampled token has no KV yet: the snapshot covers everything before it.
        assert state.num_tokens == len(p_ids(source, p)) + len(tokens) - 1
        assert state.nbytes < (state.num_tokens + CPU_MIGRATION_BLOCK_SIZE) * bytes_per_token
        state = _through_redis_encoding(state, key)
        if corrupt:
            for tensor in state.layers.values():
                tensor.zero_()
        resumed = replace(p, max_tokens=MAX_TOKENS - len(tokens))
        destination.submit(resumed, sampling, j, prefix_token_ids=tokens, kv=state)
        moved[key] = (tokens, logprobs, state.num_tokens)
    assert source.running == 0
    return moved


def p_ids(eng: Any, p: Any) -> list[int]:
    return eng.tokenize(p.prompt) if isinstance(p.prompt, str) else list(p.prompt)


def test_kv_migrated_greedy_samples_equal_the_unmigrated_ones(
    engines: tuple[Any, Any], tiny_kit: Path
) -> None:
    source, destination = engines
    prompts = _prompts(tiny_kit, 4)
    sampling = _sampling()
    for p in prompts:
        for j in range(2):
            destination.submit(p, sampling, j)
    whole = _drain(destination)
    box = destination.kv.stats()
    loads, loaded = box.loads, box.loaded_tokens
    moved = _migrate_midway(source, destination, prompts)
    tails = _drain(destination)
    for key, (tokens, logprobs, _) in moved.items():
        assert tokens + tails[key].token_ids == whole[key].token_ids
        assert logprobs + tails[key].logprobs == pytest.approx(whole[key].logprobs, abs=1e-4)
    # Every moved sample (greedy siblings share a prompt, so a snapshot each) was loaded
    # through the connector, all of its context but the newest token.
    assert box.loads - loads == len(moved) == 8
    assert box.loaded_tokens - loaded == sum(n for _, _, n in moved.values())
    assert not box.waiting


def test_the_destination_really_decodes_from_the_loaded_kv(
    engines: tuple[Any, Any], tiny_kit: Path
) -> None:
    """A zeroed snapshot must change what the destination generates: it did not recompute."""
    source, destination = engines
    prompts = _prompts(tiny_kit, 4)[2:]
    sampling = _sampling()
    for p in prompts:
        for j in range(2):
            destination.submit(p, sampling, j)
    whole = _drain(destination)
    moved = _migrate_midway(source, destination, prompts, corrupt=True)
    tails = _drain(destination)
    differs = [k for k, (tokens, _, _) in moved.items()
               if tokens + tails[k].token_ids != whole[k].token_ids]  # fmt: skip
    assert len(differs) == len(moved)


def test_a_snapshot_of_another_layout_is_refused_before_vllm_sees_it(
    engines: tuple[Any, Any], tiny_kit: Path
) -> None:
    import torch

    from rlhfspec_workers.generation.kv_migration import KVState

    _, destination = engines
    p = _prompts(tiny_kit, 1)[0]
    ids = p_ids(destination, p)
    size = destination.kv.block_size
    layers = {name: torch.zeros(1, shape[1], shape[2], shape[3] // 2)
              for name, (shape, _) in destination.kv.layout.items()}  # fmt: skip
    foreign = KVState(tuple(ids), layers, size)
    with pytest.raises(ValueError, match="does not fit layer"):
        destination.submit(p, _sampling(), 0, prefix_token_ids=[5], kv=foreign)
    assert destination.running == 0 and not destination.kv.stats().waiting


def test_an_engine_without_kv_migration_refuses_to_share_the_process(
    engines: tuple[Any, Any], tiny_kit: Path
) -> None:
    from rlhfspec_workers.generation.engine import GenerationEngine

    with pytest.raises(RuntimeError, match="KV migration lives in this process"):
        GenerationEngine(GenerationSpec(), tiny_kit / "policy", dtype="float32")
