"""Migration by KV transfer between two real vLLM engines (the MigrationConnector).

The source reads a running sample's paged KV out of its cache and aborts it; the snapshot
goes over the wire as a destination receives it (frame bytes sealed with the job's key,
verified and checked against the destination's real cache layout by ``kv_intake``); the
destination loads it through vLLM's KV connector API instead of prefilling. The stitched greedy
sample must equal the unmigrated one. A zeroed snapshot shows why the seal is needed: vLLM
loads it without complaint and decodes different tokens, so the intake must refuse it, and the
recompute it falls back to reproduces the unmigrated sample.
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
KEY = b"migration-test-key-of-32-bytes!!"


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


def _auth() -> Any:
    from rlhfspec_workers.generation.kv_auth import KVAuth

    return KVAuth(KEY, "default/kv-migration")


def _sealed(state: Any, sample_id: str) -> bytes:
    """What the source's outbox serves: the frame and its seal (``KVOutbox.put``)."""
    frame: bytes = state.to_message(sample_id).to_bytes()
    return frame + _auth().seal(f"{sample_id}#1", frame)


def _received(destination: Any, sealed: bytes, sample_id: str) -> Any:
    """What the destination loads of it: verified, fitted to its cache, decoded."""
    from rlhfspec_workers.generation.kv_intake import accept
    from rlhfspec_workers.generation.kv_migration import KVState

    port = destination.kv
    snapshot = accept(sealed, f"{sample_id}#1", sample_id, _auth(), port.layout, port.block_size)
    return KVState.from_message(snapshot)


Moved = tuple[Any, int, list[int], list[float], bytes]
"""(prompt, sample index, generated tokens, their log-probs, the sealed snapshot)."""


def _export_midway(source: Any, prompts: list[Any]) -> dict[str, Moved]:
    """Run ``prompts`` (2 samples each) on the source for a few steps, then take every running
    sample off it with its KV, as a migration's source does."""
    from rlhfspec_workers.generation.kv_migration import CPU_MIGRATION_BLOCK_SIZE

    # Whole blocks travel, of the small size a migrating CPU engine runs with (not
    # vLLM-CPU's 128): each snapshot carries under one block of positions past its context.
    assert source.kv.block_size == CPU_MIGRATION_BLOCK_SIZE
    sampling = _sampling()
    ids = {f"{p.prompt_id}/{j}": (p, j, source.submit(p, sampling, j)) for p in prompts
           for j in range(2)}  # fmt: skip
    for _ in range(4):
        assert not source.poll()  # fixed-length samples: none finishes this early
    moved: dict[str, Moved] = {}
    bytes_per_token = source.kv.bytes_per_token
    for key, (p, j, request_id) in ids.items():
        state = source.export_kv(request_id)
        tokens, logprobs = source.preempt(request_id)
        assert state is not None and len(tokens) > 0
        # The newest sampled token has no KV yet: the snapshot covers everything before it.
        assert state.num_tokens == len(p_ids(source, p)) + len(tokens) - 1
        assert state.nbytes < (state.num_tokens + CPU_MIGRATION_BLOCK_SIZE) * bytes_per_token
        moved[key] = (p, j, tokens, logprobs, _sealed(state, key))
    assert source.running == 0
    return moved


def _resume(destination: Any, moved: Moved, kv: Any) -> None:
    p, j, tokens, _, _ = moved
    resumed = replace(p, max_tokens=MAX_TOKENS - len(tokens))
    destination.submit(resumed, _sampling(), j, prefix_token_ids=tokens, kv=kv)


def _unmigrated(destination: Any, prompts: list[Any]) -> dict[str, Any]:
    for p in prompts:
        for j in range(2):
            destination.submit(p, _sampling(), j)
    return _drain(destination)


def p_ids(eng: Any, p: Any) -> list[int]:
    return eng.tokenize(p.prompt) if isinstance(p.prompt, str) else list(p.prompt)


def test_kv_migrated_greedy_samples_equal_the_unmigrated_ones(
    engines: tuple[Any, Any], tiny_kit: Path
) -> None:
    source, destination = engines
    prompts = _prompts(tiny_kit, 4)
    whole = _unmigrated(destination, prompts)
    box = destination.kv.stats()
    loads, loaded = box.loads, box.loaded_tokens
    moved = _export_midway(source, prompts)
    for key, sample in moved.items():
        _resume(destination, sample, _received(destination, sample[4], key))
    tails = _drain(destination)
    for key, (_, _, tokens, logprobs, _) in moved.items():
        assert tokens + tails[key].token_ids == whole[key].token_ids
        assert logprobs + tails[key].logprobs == pytest.approx(whole[key].logprobs, abs=1e-4)
    # Every moved sample (greedy siblings share a prompt, so a snapshot each) was loaded
    # through the connector, all of its context but the newest token.
    assert box.loads - loads == len(moved) == 8
    contexts = [len(p_ids(source, p)) + len(tokens) - 1 for p, _, tokens, _, _ in moved.values()]
    assert box.loaded_tokens - loaded == sum(contexts)
    assert not box.waiting


def test_a_zeroed_snapshot_is_refused_and_the_destination_recomputes(
    engines: tuple[Any, Any], tiny_kit: Path
) -> None:
    """Loaded anyway, a zeroed snapshot changes every moved sample (vLLM really decodes from
    the loaded KV, and cannot tell KV from zeros); the intake refuses it, and the recompute it
    falls back to reproduces the unmigrated samples."""
    from rlhfspec_workers.generation.kv_auth import TAG_BYTES, KVRefused
    from rlhfspec_workers.generation.kv_migration import KVState
    from rlhfspec_workers.messages import KVSnapshot

    source, destination = engines
    prompts = _prompts(tiny_kit, 4)[2:]
    whole = _unmigrated(destination, prompts)
    moved = _export_midway(source, prompts)
    zeroed: dict[str, bytes] = {}
    for key, sample in moved.items():
        sealed = sample[4]
        data = len(KVSnapshot.from_bytes(sealed[:-TAG_BYTES]).data)
        zeroed[key] = sealed[: -TAG_BYTES - data] + bytes(data) + sealed[-TAG_BYTES:]
        with pytest.raises(KVRefused) as refused:
            _received(destination, zeroed[key], key)
        assert refused.value.reason == "unauthentic"
        _resume(destination, sample, None)  # the fallback: recompute the prefix
    recomputed = _drain(destination)
    for key, (_, _, tokens, _, _) in moved.items():
        assert tokens + recomputed[key].token_ids == whole[key].token_ids
    # Without the seal: the zeroed KV, straight into the engine, changes every sample.
    for key, sample in moved.items():
        frame = KVSnapshot.from_bytes(zeroed[key][:-TAG_BYTES])
        _resume(destination, sample, KVState.from_message(frame))
    loaded_zeros = _drain(destination)
    differs = [k for k, (_, _, tokens, _, _) in moved.items()
               if tokens + loaded_zeros[k].token_ids != whole[k].token_ids]  # fmt: skip
    assert len(differs) == len(moved) == 4


def test_a_snapshot_of_another_layout_dtype_or_block_size_is_refused_before_vllm_sees_it(
    engines: tuple[Any, Any], tiny_kit: Path
) -> None:
    """By the intake, against the engine's real cache layout, each with its reason; and by
    the engine itself, should one get past it."""
    import torch

    from rlhfspec_workers.generation.kv_auth import KVRefused
    from rlhfspec_workers.generation.kv_migration import KVState, blocks_for

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
    blocks = blocks_for(len(ids), size)
    fitting = {name: torch.zeros(blocks, *shape[1:])
               for name, (shape, _) in destination.kv.layout.items()}  # fmt: skip
    half = {name: t.to(torch.bfloat16) for name, t in fitting.items()}
    cases = {
        "layout": foreign,
        "dtype": KVState(tuple(ids), half, size),
        "block_size": KVState(tuple(ids), fitting, size // 2),
    }
    for reason, state in cases.items():
        with pytest.raises(KVRefused) as refused:
            _received(destination, _sealed(state, "it0/p0/0"), "it0/p0/0")
        assert refused.value.reason == reason, refused.value
    fits = _received(
        destination, _sealed(KVState(tuple(ids), fitting, size), "it0/p0/0"), "it0/p0/0"
    )
    assert fits.num_tokens == len(ids) and fits.block_size == size


def test_an_engine_without_kv_migration_refuses_to_share_the_process(
    engines: tuple[Any, Any], tiny_kit: Path
) -> None:
    from rlhfspec_workers.generation.engine import GenerationEngine

    with pytest.raises(RuntimeError, match="KV migration lives in this process"):
        GenerationEngine(GenerationSpec(), tiny_kit / "policy", dtype="float32")
