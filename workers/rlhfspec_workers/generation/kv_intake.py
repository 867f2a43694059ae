"""The destination's side of a KV migration: a pulled snapshot this engine may load, or the
named reason it recomputes the sample's prefix instead.

Where it sits: in the generation worker (``worker.GenerationWorker``), on the pull thread that
runs beside the engine, between a KV-migrated task's ``kv_snapshot_url`` and the engine's
submit (``kv_migration.KVState.from_message``, then the engine's own layout check). In order:
the URL must be a peer outbox's http(s) URL, the pull must carry this job's token
(``kv_outbox.pull``), the frame's seal must verify with this job's key (``kv_auth``), and the
verified header must describe this sample and this engine's cache (block size, layers, block
shape, dtype, byte count). Each failure is a :class:`kv_auth.KVRefused` with its reason; a
refused snapshot never reaches vLLM: a zeroed or forged one would load and silently change
the sample's tokens, since nothing downstream can tell KV from noise.

Pure (no torch): the checks read the snapshot's header, not its tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from rlhfspec_workers.messages import KVSnapshot, MessageError

from . import kv_outbox
from .kv_auth import KVAuth, KVRefused

Layout = Mapping[str, tuple[tuple[int, ...], str]]
"""An engine's paged KV caches: attention layer -> (cache shape [blocks, *block_shape],
dtype name), as ``kv_migration.KVMigrationPort.layout`` learns them."""
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def fetch(
    url: str,
    sample_id: str,
    auth: KVAuth | None,
    layout: Layout,
    block_size: int,
    *,
    timeout: float = 10.0,
) -> KVSnapshot:
    """Pull the snapshot at ``url`` and :func:`accept` it (KVRefused on any failure)."""
    key, sealed = kv_outbox.pull(url, auth, timeout=timeout)
    assert auth is not None  # pull refuses without a key
    return accept(sealed, key, sample_id, auth, layout, block_size)


def accept(
    sealed: bytes, key: str, sample_id: str, auth: KVAuth, layout: Layout, block_size: int
) -> KVSnapshot:
    """The snapshot in ``sealed`` (pulled as ``key``) once it verifies and fits this engine."""
    frame = auth.open(key, sealed)
    try:
        snapshot = KVSnapshot.from_bytes(frame)
    except MessageError as exc:
        raise KVRefused("malformed", str(exc)) from None
    if snapshot.sample_id != sample_id:
        raise KVRefused("wrong_sample", f"snapshot of {snapshot.sample_id}, not {sample_id}")
    check_fits(snapshot, layout, block_size)
    return snapshot


def check_fits(snapshot: KVSnapshot, layout: Layout, block_size: int) -> None:
    """KVRefused unless ``snapshot`` has exactly this engine's cache geometry and dtype."""
    if snapshot.block_size != block_size:
        got = snapshot.block_size
        raise KVRefused("block_size", f"blocks of {got} tokens, this engine's hold {block_size}")
    names = snapshot.layer_names
    if len(set(names)) != len(names) or set(names) != set(layout):
        theirs, ours = _brief(names), _brief(sorted(layout))
        raise KVRefused("layout", f"layers {theirs} are not this engine's {ours}")
    for name in names:
        shape, dtype = layout[name]
        if list(shape[1:]) != snapshot.block_shape:
            fit = f"block shape {snapshot.block_shape} does not fit layer {name} {list(shape[1:])}"
            raise KVRefused("layout", fit)
        if dtype != snapshot.dtype:
            raise KVRefused("dtype", f"{snapshot.dtype} is not this engine's {dtype} ({name})")
    blocks = -(-len(snapshot.token_ids) // block_size)
    expected = len(names) * blocks * math.prod(snapshot.block_shape)
    expected *= ELEMENT_BYTES[snapshot.dtype]
    if len(snapshot.data) != expected:
        got_bytes = len(snapshot.data)
        raise KVRefused("malformed", f"{got_bytes} bytes of KV, its header says {expected}")


def _brief(names: list[str]) -> str:
    return str(names if len(names) <= 4 else [*names[:3], f"... {len(names)} in all"])
