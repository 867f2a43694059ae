"""The generation worker's sample table (``generation/sample_table.py``): every sample it holds
as one object with one status, keyed by the task's sample id; each legal transition moves it,
every other one raises, finished and preempted samples leave, a pull in flight is dropped when
its sample moves on, and a second copy of a held sample joins it instead of running twice.
Pure: no engine, no Redis."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from rlhfspec_workers.generation.sample_table import (
    IllegalTransition,
    Pull,
    SampleStatus,
    SampleTable,
)
from rlhfspec_workers.messages import SampleTask

QUEUED, PULLING, RUNNING = SampleStatus.QUEUED, SampleStatus.PULLING_KV, SampleStatus.RUNNING
SHARED, DIRECT = "rlhfspec:job:tasks", "rlhfspec:job:tasks:generation-1"


def _task(prompt: int, index: int = 0, *, version: int = 0, kv: bool = False) -> SampleTask:
    return SampleTask(
        iteration=1, sample_id=f"it1/p{prompt}/{index}", prompt_id=f"p{prompt}",
        group_id=f"p{prompt}", sample_index=index, prompt="2+2=", max_tokens=8,
        temperature=1.0, top_p=1.0, weight_version=version,
        kv_snapshot_url="http://generation-0:9401/kv/x" if kv else None,
    )  # fmt: skip


def _table(*tasks: SampleTask) -> SampleTable:
    table = SampleTable()
    for n, task in enumerate(tasks):
        assert table.add(SHARED, f"{n}-0", task) is not None
    return table


def _pull() -> Pull:
    return Future()


def test_a_sample_is_queued_then_runs_then_finishes_and_leaves() -> None:
    table = _table(_task(1))
    sample = table.get("it1/p1/0")
    assert sample is not None and sample.status is QUEUED and sample.entries == [(SHARED, "0-0")]
    assert "it1/p1/0" in table and len(table) == 1
    assert table.waiting() == [sample] and table.running() == []
    assert table.start("it1/p1/0") is sample and sample.status is RUNNING
    assert table.waiting() == [] and table.running() == [sample]
    assert table.finish("it1/p1/0") is sample and sample.status is SampleStatus.FINISHED
    assert len(table) == 0 and table.get("it1/p1/0") is None and "it1/p1/0" not in table


def test_a_kv_migrated_sample_pulls_then_runs_and_its_pull_is_taken() -> None:
    table = _table(_task(1, kv=True))
    pull = _pull()
    sample = table.start_pull("it1/p1/0", pull)
    assert sample.status is PULLING and sample.pull is pull
    assert table.waiting() == [sample]  # still in line while its snapshot is on the way
    table.start("it1/p1/0")
    assert sample.status is RUNNING and sample.pull is None and not pull.cancelled()


@pytest.mark.parametrize("before", [QUEUED, PULLING, RUNNING])
def test_any_live_sample_can_be_preempted_and_a_pull_in_flight_is_dropped(
    before: SampleStatus,
) -> None:
    table = _table(_task(1), _task(2))
    pull = _pull()
    if before is PULLING:
        table.start_pull("it1/p1/0", pull)
    if before is RUNNING:
        table.start("it1/p1/0")
    sample = table.preempt("it1/p1/0")
    assert sample.status is SampleStatus.PREEMPTED and "it1/p1/0" not in table
    assert pull.cancelled() == (before is PULLING) and sample.pull is None
    assert [s.sample_id for s in table.waiting()] == ["it1/p2/0"]


@pytest.mark.parametrize("before", [QUEUED, PULLING])
def test_a_waiting_sample_already_published_elsewhere_finishes_without_running(
    before: SampleStatus,
) -> None:
    table = _table(_task(1))
    pull = _pull()
    if before is PULLING:
        table.start_pull("it1/p1/0", pull)
    sample = table.finish_elsewhere("it1/p1/0")
    assert sample.status is SampleStatus.FINISHED and len(table) == 0
    assert pull.cancelled() == (before is PULLING)


def test_illegal_transitions_raise_and_leave_the_sample_as_it_was() -> None:
    table = _table(_task(1), _task(2))
    with pytest.raises(IllegalTransition, match="queued -> finished"):
        table.finish("it1/p1/0")  # never ran here
    table.start("it1/p1/0")
    for move in (table.start, table.finish_elsewhere):
        with pytest.raises(IllegalTransition, match="running -> "):
            move("it1/p1/0")
    with pytest.raises(IllegalTransition, match="running -> pulling_kv"):
        table.start_pull("it1/p1/0", _pull())
    table.start_pull("it1/p2/0", _pull())
    with pytest.raises(IllegalTransition, match="pulling_kv -> pulling_kv"):
        table.start_pull("it1/p2/0", _pull())  # one pull per sample
    assert [s.status for s in (table.get("it1/p1/0"), table.get("it1/p2/0")) if s] == [
        RUNNING,
        PULLING,
    ]


@pytest.mark.parametrize("leave", ["finish", "preempt", "finish_elsewhere"])
def test_a_sample_that_left_cannot_move_again(leave: str) -> None:
    table = _table(_task(1))
    if leave == "finish":
        table.start("it1/p1/0")
    getattr(table, leave)("it1/p1/0")
    for move in (table.start, table.finish, table.finish_elsewhere, table.preempt):
        with pytest.raises(IllegalTransition, match="not held here"):
            move("it1/p1/0")
    with pytest.raises(IllegalTransition, match="not held here"):
        table.start_pull("it1/p1/0", _pull())


def test_a_second_copy_of_a_held_sample_joins_it_instead_of_running_twice() -> None:
    table = _table(_task(1))
    table.start("it1/p1/0")
    # The same sample handed over and also reclaimed from the worker that died handing it.
    assert table.add(DIRECT, "9-0", _task(1)) is None
    assert table.add(SHARED, "0-0", _task(1)) is None  # an entry read twice counts once
    sample = table.get("it1/p1/0")
    assert sample is not None and len(table) == 1 and sample.status is RUNNING
    assert sample.entries == [(SHARED, "0-0"), (DIRECT, "9-0")]
    assert table.entries_by_stream() == {SHARED: ["0-0"], DIRECT: ["9-0"]}
    # Once it left, a copy read later is a sample of its own again (the done set skips it).
    table.finish("it1/p1/0")
    assert table.add(SHARED, "5-0", _task(1)) is not None


def test_samples_wait_in_arrival_order_and_only_those_the_loaded_policy_serves_are_ready() -> None:
    table = _table(_task(1), _task(2), _task(3, version=2), _task(4))
    assert [s.sample_id for s in table.ready(0)] == ["it1/p1/0", "it1/p2/0"]
    assert table.next_weight_version() == 0
    table.start("it1/p1/0")
    table.start_pull("it1/p2/0", _pull())
    # A pulling sample keeps its place; one needing a newer policy blocks those behind it.
    assert [s.sample_id for s in table.ready(1)] == ["it1/p2/0"]
    table.finish_elsewhere("it1/p2/0")
    assert table.ready(1) == [] and table.next_weight_version() == 2
    assert [s.sample_id for s in table.ready(2)] == ["it1/p3/0", "it1/p4/0"]
    assert [s.sample_id for s in table.running()] == ["it1/p1/0"]


def test_lease_renewal_sees_every_entry_held_by_stream() -> None:
    table = SampleTable()
    table.add(SHARED, "1-0", _task(1))
    table.add(DIRECT, "2-0", _task(2))
    table.add(SHARED, "3-0", _task(3))
    table.start("it1/p2/0")
    assert table.entries_by_stream() == {SHARED: ["1-0", "3-0"], DIRECT: ["2-0"]}
    table.preempt("it1/p1/0")
    assert table.entries_by_stream() == {DIRECT: ["2-0"], SHARED: ["3-0"]}


def test_an_empty_table_has_nothing_to_wait_for() -> None:
    table = SampleTable()
    assert len(table) == 0 and not table
    assert table.waiting() == [] and table.running() == [] and table.ready(5) == []
    assert table.next_weight_version() is None and table.entries_by_stream() == {}
