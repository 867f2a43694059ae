"""KV snapshots as whole paged-cache blocks: read, encode for Redis, decode, write back.

Pure torch on CPU; the same functions move real vLLM caches in
``tests/integration/test_kv_migration.py``.
"""

from __future__ import annotations

import pytest
import torch

from rlhfspec_workers.generation.kv_migration import KVState, blocks_for, read_kv, write_kv
from rlhfspec_workers.messages import KVSnapshot, MessageError

BLOCK = 4


def _caches(num_blocks: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, 2, BLOCK, 6)  # [blocks, heads, block_size, C]
    return {f"layers.{i}.attn": torch.randn(shape, generator=g).to(torch.bfloat16)
            for i in range(3)}  # fmt: skip


def test_a_snapshot_carries_the_blocks_of_its_context_through_redis_bytes() -> None:
    source = _caches()
    source_blocks = [7, 2, 5]  # 9 context tokens -> 3 blocks, scattered in the pool
    state = KVState(tuple(range(9)), read_kv(source, source_blocks, BLOCK, 9), BLOCK)
    assert blocks_for(9, BLOCK) == 3 and state.nbytes == 3 * 3 * 2 * BLOCK * 6 * 2
    back = KVState.from_message(KVSnapshot.from_bytes(state.to_message("s/0").to_bytes()))
    assert back.token_ids == state.token_ids and back.block_size == BLOCK
    for name, blocks in state.layers.items():
        assert torch.equal(back.layers[name], blocks)
        assert back.layers[name].dtype == torch.bfloat16

    destination = _caches(seed=1)
    before = {n: c.clone() for n, c in destination.items()}
    dest_blocks = [0, 3, 9]
    # The first block is a local prefix-cache hit at the destination: loading starts after it.
    write_kv(destination, back, dest_blocks, start=BLOCK, stop=9)
    for name, cache in destination.items():
        assert torch.equal(cache[3], source[name][2]) and torch.equal(cache[9], source[name][5])
        untouched = [b for b in range(10) if b not in (3, 9)]
        assert torch.equal(cache[untouched], before[name][untouched])


def test_a_load_off_a_block_boundary_is_refused() -> None:
    caches = _caches()
    state = KVState(tuple(range(9)), read_kv(caches, [1, 2, 3], BLOCK, 9), BLOCK)
    with pytest.raises(ValueError, match="block boundary"):
        write_kv(caches, state, [4, 5, 6], start=2, stop=9)


def test_a_truncated_snapshot_is_rejected_with_its_sample_id() -> None:
    state = KVState(tuple(range(5)), read_kv(_caches(), [1, 2], BLOCK, 5), BLOCK)
    msg = state.to_message("it3/p1/2")
    short = msg.model_copy(update={"data": msg.data[: len(msg.data) // 2 // 4 * 4]})
    with pytest.raises(ValueError, match="it3/p1/2"):
        KVState.from_message(short)
    raw = msg.to_bytes()
    size = int.from_bytes(raw[4:8], "big")
    header = raw[8 : 8 + size].replace(b'"bfloat16"', b'"int8"')
    with pytest.raises(MessageError, match="dtype"):
        KVSnapshot.from_bytes(b"RSKV" + len(header).to_bytes(4, "big") + header + msg.data)


def test_the_frame_header_is_checked_like_every_message() -> None:
    msg = KVState(tuple(range(5)), read_kv(_caches(), [1, 2], BLOCK, 5), BLOCK).to_message("s")
    raw = msg.to_bytes()
    assert raw.startswith(b"RSKV") and raw.endswith(msg.data)
    assert len(raw) < len(msg.data) + 400  # raw tensor bytes, not base64 in JSON
    assert KVSnapshot.from_bytes(raw) == msg
    with pytest.raises(MessageError, match="unsupported"):
        KVSnapshot.from_bytes(raw.replace(b'"version":1', b'"version":2', 1))
    with pytest.raises(MessageError, match="kind"):
        KVSnapshot.from_bytes(raw.replace(b'"kv_snapshot"', b'"kv_snapshoT"', 1))
    with pytest.raises(MessageError, match="not a KV snapshot frame"):
        KVSnapshot.from_bytes(b"{}")
    with pytest.raises(MessageError, match="overruns"):
        KVSnapshot.from_bytes(raw[:20])
