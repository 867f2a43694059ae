"""KV-cache migration: a vLLM KV connector that lets a migrated sample skip its re-prefill.

Where it sits: between two generation engines during a ``kv_transfer`` migration
(``handover.Handover``). The source engine reads the sample's paged KV out of its cache before
aborting it (:func:`read_kv`, ``GenerationEngine.export_kv``); the snapshot travels as a
``messages.KVSnapshot`` frame, pulled by the destination from the source's outbox
(``kv_outbox``); the destination engine deposits it in its inbox (:func:`deposit`) and submits
the sample as usual (prompt + generated tokens). vLLM's scheduler asks
:class:`MigrationConnector` how many of the request's tokens it can supply: the snapshot's,
minus one (vLLM must compute at least the last token to sample the next one). In the step that
schedules the request, the connector's worker side copies those tokens' cache blocks into the
freshly allocated ones (:func:`write_kv`) before the forward pass, so the destination computes
one token instead of the whole context. Recompute stays the fallback: no snapshot (lost,
expired, another model) simply means no external tokens.

vLLM keeps ONE worker-side connector per process (``kv_transfer_state``), shared by every
engine in it, so the worker side holds no engine state: it writes into the KV tensors of the
forward context it is handed, with the metadata the running engine's scheduler built. The
scheduler side is per engine; each engine has its own inbox (``kv_connector_extra_config``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from rlhfspec_workers.messages import KVSnapshot

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

CONNECTOR_NAME = "MigrationConnector"
CONNECTOR_MODULE = __name__
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_MIGRATION_BLOCK_SIZE = 32
"""Cache block size of a CPU engine that migrates KV (vLLM-CPU's default is 128 tokens).
Whole blocks travel, so the block size bounds the junk a snapshot carries: a 34-token context
ships 64 tokens' KV instead of 128, half the bytes to export, send and load. 32 is the
smallest block the CPU attention kernels take; GPU backends default to 16 and are left alone."""


@dataclass
class KVState:
    """The KV of a sample's first ``len(token_ids)`` context tokens, per attention layer, as
    the whole cache blocks holding them: ``layers[name]`` is [blocks, *block_shape].

    Whole blocks, because a block's interior is the attention backend's business (vLLM-CPU
    keeps all keys of a block and head before all its values, in an ISA-specific order): only
    the block axis means the same thing everywhere. Positions past the context in the last
    block are junk the destination overwrites as it decodes; attention never reads them."""

    token_ids: tuple[int, ...]
    layers: dict[str, torch.Tensor]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers.values())

    def to_message(self, sample_id: str) -> KVSnapshot:
        names = sorted(self.layers)
        first = self.layers[names[0]]
        # One copy into the frame (a snapshot is megabytes, moved while engines wait).
        raw = b"".join(self.layers[n].contiguous().view(torch.uint8).numpy().data for n in names)
        return KVSnapshot(
            sample_id=sample_id,
            token_ids=list(self.token_ids),
            block_size=self.block_size,
            dtype=_dtype_name(first.dtype),
            layer_names=names,
            block_shape=list(first.shape[1:]),
            data=raw,
        )

    @classmethod
    def from_message(cls, msg: KVSnapshot) -> KVState:
        dtype = _DTYPES[msg.dtype]
        raw = msg.data
        blocks = blocks_for(len(msg.token_ids), msg.block_size)
        shape = (len(msg.layer_names), blocks, *msg.block_shape)
        with warnings.catch_warnings():
            # Read-only bytes: the tensors are only read, to be copied into vLLM's cache.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            flat = (
                torch.frombuffer(raw, dtype=torch.uint8)
                if raw
                else torch.empty(0, dtype=torch.uint8)
            )
        expected = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if flat.numel() != expected:
            raise ValueError(f"KV snapshot of {msg.sample_id}: {flat.numel()} bytes, "
                             f"want {expected} for shape {shape} {msg.dtype}")  # fmt: skip
        stacked = flat.view(dtype).reshape(shape)
        layers = dict(zip(msg.layer_names, stacked, strict=True))
        return cls(tuple(msg.token_ids), layers, msg.block_size)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"KV cache dtype {dtype} cannot be migrated (allowed: {sorted(_DTYPES)})")


# -- paged-cache access (pure torch, tested on CPU) -------------------------------------------


def read_kv(
    caches: Mapping[str, torch.Tensor], block_ids: Sequence[int], block_size: int, n: int
) -> dict[str, torch.Tensor]:
    """Copy the blocks holding context positions [0, n) out of per-layer paged caches
    (block axis first: vLLM's per-layer [blocks, heads, block_size, C] view)."""
    index = torch.tensor(list(block_ids[: blocks_for(n, block_size)]), dtype=torch.long)
    return {name: cache[index] for name, cache in caches.items()}  # indexing copies


def write_kv(
    caches: Mapping[str, torch.Tensor],
    state: KVState,
    block_ids: Sequence[int],
    start: int,
    stop: int,
) -> None:
    """Write the snapshot's positions [start, stop) into the request's blocks. ``start`` is
    where vLLM's own prefix-cache hit ends, always a block boundary (the scheduler hands the
    connector a block-aligned local hit), so no shared block is touched."""
    size = state.block_size
    if start % size:
        raise ValueError(f"KV load must start at a block boundary, not {start}")
    first, last = start // size, blocks_for(stop, size)
    index = torch.tensor(list(block_ids[first:last]), dtype=torch.long)
    for name, cache in caches.items():
        cache[index] = state.layers[name][first:last].to(cache.dtype)


def layer_caches(layers: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The paged KV tensor of every attention layer in a vLLM forward context."""
    caches: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        kv = getattr(layer, "kv_cache", None)
        if isinstance(kv, list | tuple):
            kv = kv[0] if kv else None
        if isinstance(kv, torch.Tensor) and kv.dim() == 4 and kv.numel() > 0:
            caches[name] = kv
    return caches


# -- inboxes: snapshots waiting for their request ---------------------------------------------


@dataclass
class Inbox:
    """Snapshots deposited for requests an engine is about to receive, by their prompt."""

    waiting: dict[tuple[int, ...], list[KVState]] = field(default_factory=dict)
    """Greedy siblings migrated at the same point share a prompt (and so their KV): a queue."""
    loads: int = 0
    loaded_tokens: int = 0
    load_seconds: float = 0.0


_INBOXES: dict[str, Inbox] = {}


def inbox(name: str) -> Inbox:
    return _INBOXES.setdefault(name, Inbox())


def deposit(name: str, prompt_token_ids: Sequence[int], state: KVState) -> None:
    """Offer ``state`` to the next request whose prompt is exactly ``prompt_token_ids``."""
    if tuple(prompt_token_ids[: state.num_tokens]) != state.token_ids:
        raise ValueError("KV snapshot does not match the resumed prompt's tokens")
    inbox(name).waiting.setdefault(tuple(prompt_token_ids), []).append(state)


def drop_inbox(name: str) -> None:
    _INBOXES.pop(name, None)


# -- the connector ----------------------------------------------------------------------------


@dataclass
class _Load:
    state: KVState
    block_ids: list[int]
    start: int
    stop: int


@dataclass
class MigrationMetadata(KVConnectorMetadata):  # type: ignore[misc]
    inbox: str
    loads: list[_Load] = field(default_factory=list)


class MigrationConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """vLLM KV connector (``kv_role="kv_consumer"``) loading migrated samples' KV snapshots."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.inbox_name = str(extra.get("inbox", "default"))
        self._start: dict[str, int] = {}
        self._loads: list[_Load] = []

    # scheduler side ---------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        queue = inbox(self.inbox_name).waiting.get(tuple(request.prompt_token_ids or ()))
        if not queue:
            return 0, False
        state = queue[0]
        # vLLM computes at least the last prompt token itself (it samples from its logits).
        usable = min(state.num_tokens, len(request.prompt_token_ids or ()) - 1)
        self._start[request.request_id] = num_computed_tokens
        return max(usable - num_computed_tokens, 0), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        start = self._start.pop(request.request_id, None)
        if num_external_tokens <= 0 or start is None:
            return
        box = inbox(self.inbox_name)
        key = tuple(request.prompt_token_ids or ())
        queue = box.waiting.get(key)
        groups = blocks.get_block_ids()
        if not queue or len(groups) != 1:
            # vLLM now counts these tokens as computed: loading nothing would decode garbage.
            raise RuntimeError(f"KV snapshot of {request.request_id} vanished before loading")
        state = queue.pop(0)
        if not queue:
            del box.waiting[key]
        self._loads.append(_Load(state, list(groups[0]), start, start + num_external_tokens))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> MigrationMetadata:
        meta = MigrationMetadata(self.inbox_name, self._loads)
        self._loads = []
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._start.pop(request.request_id, None)
        return False, None

    # worker side (shared by every engine of the process: no engine state here) ----------------

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, MigrationMetadata) or not meta.loads:
            return
        started = time.perf_counter()
        caches = layer_caches(forward_context.no_compile_layers)
        box = inbox(meta.inbox)
        for load in meta.loads:
            mine = {name: caches[name] for name in load.state.layers if name in caches}
            if len(mine) != len(caches):
                raise RuntimeError(
                    f"KV snapshot layers {sorted(load.state.layers)} do not cover this "
                    f"engine's attention layers {sorted(caches)}"
                )
            write_kv(mine, load.state, load.block_ids, load.start, load.stop)
            box.loads += 1
            box.loaded_tokens += load.stop - load.start
        box.load_seconds += time.perf_counter() - started

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None  # exports happen at abort time (read_kv), not during forward passes

    def wait_for_save(self) -> None:
        return None


# -- the engine's side: one port per GenerationEngine ------------------------------------------

_LIVE_PORTS: set[str] = set()


def _probe_caches(worker: Any) -> tuple[dict[str, tuple[tuple[int, ...], str]], int]:
    runner = worker.model_runner
    caches = layer_caches(runner.compilation_config.static_forward_context)
    layout = {name: (tuple(t.shape), _dtype_name(t.dtype)) for name, t in caches.items()}
    return layout, int(runner.cache_config.block_size)


def _read_request_kv(worker: Any, block_ids: list[int], n: int) -> dict[str, torch.Tensor]:
    runner = worker.model_runner
    caches = layer_caches(runner.compilation_config.static_forward_context)
    return read_kv(caches, block_ids, int(runner.cache_config.block_size), n)


class KVMigrationPort:
    """A GenerationEngine's KV migration path: engine arguments, export, deposit, stats."""

    def __init__(self) -> None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if has_kv_transfer_group() and not isinstance(get_kv_transfer_group(),
                                                      MigrationConnector):  # fmt: skip
            raise RuntimeError("another KV connector owns this process; KV migration needs its own")
        self.name = f"inbox-{id(self):x}-{time.monotonic_ns():x}"
        _LIVE_PORTS.add(self.name)
        self.layout: dict[str, tuple[tuple[int, ...], str]] = {}
        self.block_size = 0

    def engine_args(self, device: str) -> dict[str, Any]:
        args: dict[str, Any] = {} if device != "cpu" else {"block_size": CPU_MIGRATION_BLOCK_SIZE}
        return args | {
            "kv_transfer_config": {
                "kv_connector": CONNECTOR_NAME,
                "kv_connector_module_path": CONNECTOR_MODULE,
                "kv_role": "kv_consumer",  # loads snapshots; exports happen outside vLLM
                "kv_connector_extra_config": {"inbox": self.name},
            }
        }

    def attach(self, llm_engine: Any) -> None:
        """After the engine exists: learn its cache layout (to refuse foreign snapshots)."""
        self.layout, self.block_size = llm_engine.collective_rpc(_probe_caches)[0]

    @property
    def bytes_per_token(self) -> int:
        total = 0
        for shape, dtype in self.layout.values():
            element = torch.empty((), dtype=_DTYPES[dtype]).element_size()
            total += int(torch.Size(shape[1:]).numel()) * element // max(self.block_size, 1)
        return total

    def export(self, llm_engine: Any, internal_id: str) -> KVState | None:
        """The KV a running request has computed (prompt + generated but the newest token), read
        between engine steps; None when vLLM does not hold it (not scheduled yet)."""
        core = llm_engine.engine_core.engine_core
        request = core.scheduler.requests.get(internal_id)
        if request is None:
            return None
        groups = core.scheduler.kv_cache_manager.get_block_ids(internal_id)
        n = min(int(request.num_computed_tokens), int(request.num_tokens) - 1)
        if len(groups) != 1 or n <= 0:
            return None
        layers = llm_engine.collective_rpc(_read_request_kv, args=(list(groups[0]), n))[0]
        tokens = tuple(int(t) for t in request.all_token_ids[:n])
        return KVState(tokens, layers, self.block_size)

    def check(self, state: KVState) -> None:
        """Refuse a snapshot of another model or cache layout before vLLM sees it."""
        if state.block_size != self.block_size:
            raise ValueError(f"KV snapshot block size {state.block_size} is not this "
                             f"engine's {self.block_size}")  # fmt: skip
        for name, (shape, dtype) in self.layout.items():
            got = state.layers.get(name)
            if got is None or tuple(got.shape[1:]) != shape[1:]:
                raise ValueError(f"KV snapshot does not fit layer {name} of this engine")
            if _dtype_name(got.dtype) != dtype:
                raise ValueError(f"KV snapshot dtype {got.dtype} is not this engine's {dtype}")
        if set(state.layers) != set(self.layout):
            raise ValueError("KV snapshot layers differ from this engine's attention layers")

    def deposit(self, prompt_token_ids: Sequence[int], state: KVState) -> None:
        self.check(state)
        deposit(self.name, prompt_token_ids, state)

    def stats(self) -> Inbox:
        return inbox(self.name)

    def close(self) -> None:
        """Drop this engine's inbox; the last port also drops vLLM's process-wide worker
        connector, so an engine without KV migration can run in this process again."""
        drop_inbox(self.name)
        _LIVE_PORTS.discard(self.name)
        if not _LIVE_PORTS:
            from vllm.distributed.kv_transfer import kv_transfer_state

            kv_transfer_state._KV_CONNECTOR_AGENT = None


def kv_migration_live() -> bool:
    """Whether an engine with KV migration lives in this process."""
    return bool(_LIVE_PORTS)
