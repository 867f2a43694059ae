"""The generation worker's side of a refused KV snapshot: every refusal recomputes and is
counted under its reason (``kv_fallback:<reason>`` beside ``kv_fallbacks`` in the iteration's
generation stats), a verified snapshot becomes the KV the engine loads.

``KVPulls.load`` (``kv_pull.py``) is driven with the pull's future as the pull thread leaves
it, without an engine, as the pull and its checks are covered over real HTTP in
``test_kv_auth.py``."""

from __future__ import annotations

import typing
from concurrent.futures import Future
from typing import Any

import torch

from rlhfspec_workers.generation.counters import GenerationCounters
from rlhfspec_workers.generation.kv_auth import FallbackReason, KVRefused
from rlhfspec_workers.generation.kv_migration import KVState
from rlhfspec_workers.generation.kv_pull import KVPulls
from rlhfspec_workers.generation.sample_table import Pull
from rlhfspec_workers.messages import KVSnapshot, SampleTask

URL = "http://tiny-grpo-generation-0.tiny-grpo-generation.team-a.svc:9401/kv/it2%2Fp1%2F0%231"


def _task(url: str | None = URL) -> SampleTask:
    return SampleTask(
        iteration=2, sample_id="it2/p1/0", prompt_id="p1", group_id="p1", sample_index=0,
        prompt="2+2=", max_tokens=8, temperature=1.0, top_p=1.0, kv_snapshot_url=url,
    )  # fmt: skip


def _pulls() -> tuple[KVPulls, list[tuple[Any, ...]], list[int]]:
    letters: list[tuple[Any, ...]] = []
    received: list[int] = []
    pulls = KVPulls(
        "generation-1",
        None,
        None,
        GenerationCounters(),
        dead_letter=lambda *args: letters.append(args),
        observe_received=lambda n, s: received.append(n),
    )
    return pulls, letters, received


def _pulled(outcome: BaseException | tuple[KVSnapshot, float]) -> Pull:
    """The pull's future as the pull thread leaves it."""
    future: Pull = Future()
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
    return future


def test_each_refusal_recomputes_and_is_counted_under_its_reason() -> None:
    for reason in typing.get_args(FallbackReason):
        pulls, letters, received = _pulls()
        assert pulls.load(_task(), _pulled(KVRefused(reason, "what happened"))) is None
        assert pulls.counters.drain() == {2: {"kv_fallbacks": 1.0, f"kv_fallback:{reason}": 1.0}}
        assert received == []
        # Only a snapshot sealed by this job yet unreadable is kept for a look (a bug, not an
        # attack: unauthenticated bytes are never stored).
        assert len(letters) == (1 if reason == "malformed" else 0), reason


def test_an_unexpected_failure_of_the_pull_counts_as_unreachable() -> None:
    pulls, _, _ = _pulls()
    assert pulls.load(_task(), _pulled(ConnectionResetError("peer reset"))) is None
    assert pulls.counters.drain() == {2: {"kv_fallbacks": 1.0, "kv_fallback:unreachable": 1.0}}


def test_a_verified_snapshot_becomes_the_kv_to_load() -> None:
    layers = {f"l{i}": torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + i
              for i in range(2)}  # fmt: skip
    snapshot = KVState(tuple(range(7)), layers, 4).to_message("it2/p1/0")
    pulls, _, received = _pulls()
    state = pulls.load(_task(), _pulled((snapshot, 0.25)))
    assert state is not None and state.token_ids == tuple(range(7))
    assert all(torch.equal(state.layers[n], layers[n]) for n in layers)
    stats = pulls.counters.drain()[2]
    assert "kv_fallbacks" not in stats and stats["kv_pull_seconds"] == 0.25
    assert received == [len(snapshot.data)]


def test_a_task_without_a_snapshot_loads_nothing_and_counts_nothing() -> None:
    pulls, _, _ = _pulls()
    assert pulls.load(_task(url=None), None) is None
    assert pulls.counters.drain() == {}


def test_a_verified_snapshot_that_still_does_not_decode_is_malformed_and_dead_lettered() -> None:
    inconsistent = KVSnapshot(
        sample_id="it2/p1/0", token_ids=[1, 2, 3], block_size=4, dtype="float32",
        layer_names=["l0"], block_shape=[3, 4], data=b"\x00" * 5,
    )  # fmt: skip
    pulls, letters, _ = _pulls()
    assert pulls.load(_task(), _pulled((inconsistent, 0.1))) is None
    assert pulls.counters.drain() == {2: {"kv_fallbacks": 1.0, "kv_fallback:malformed": 1.0}}
    assert len(letters) == 1 and "it2/p1/0" in letters[0][3]
