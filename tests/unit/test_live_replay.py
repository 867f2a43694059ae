"""The history-keeping drafters (suffix, suffix_tree) replayed live in the hindsight replay,
and reset between benchmark runs: their drafts follow the replayed schedule, not the shadow
run's lock step, and no run drafts from an earlier run's rollouts."""

from __future__ import annotations

import numpy as np
import pytest

from rlhfspec_workers.benchmarks.hindsight_oracle import iteration_traces
from rlhfspec_workers.drafters.base import DraftRow, KeepsHistory
from rlhfspec_workers.drafters.suffix import SuffixDrafter
from rlhfspec_workers.drafters.suffix_tree import SuffixTreeDrafter
from rlhfspec_workers.generation.shadow import LiveReplay, ShadowDrafts

PROMPT = [1, 2, 3]
RESPONSE = [40, 41, 42, 43, 44, 45, 46, 47]
"""Both siblings sample the same response (no token repeats: nothing matches within it)."""


def row(req: str, out: int, max_k: int = 4) -> DraftRow:
    tokens = np.asarray(PROMPT + RESPONSE[:out], dtype=np.int64)
    return DraftRow(req, tokens, len(PROMPT), group="g", max_k=max_k)


def lock_step_shadow(drafters: list[KeepsHistory]) -> ShadowDrafts:
    """A plain-decoding shadow run of two siblings: both reach every position together."""
    shadow = ShadowDrafts()
    for out in range(1, len(RESPONSE) + 1):
        rows = [row("a", out), row("b", out)]
        shadow.record(rows, {d.name: d.propose(rows, 4) for d in drafters})
    return shadow


@pytest.mark.parametrize("make", [SuffixDrafter, SuffixTreeDrafter])
def test_a_sibling_run_ahead_drafts_for_the_one_behind(make: type[KeepsHistory]) -> None:
    in_shadow = make()
    shadow = lock_step_shadow([in_shadow])
    [trace] = [t for t in shadow.traces() if t.key == "b"]
    # In lock step neither sibling is ever ahead: the static trace shows no match at all.
    assert sum(trace.matches[in_shadow.name]) == 0
    traces = {t.key: t for t in shadow.traces(exclude=[in_shadow.name])}
    replay = LiveReplay(shadow, [in_shadow.fresh()], max_k=4)
    # The replayed schedule put "a" 4 tokens ahead of "b" (it accepted more drafts).
    matches = replay([(traces["a"], 8), (traces["b"], 4)])
    assert matches[in_shadow.name][1] == 4  # "b" drafts a's next 4 tokens, all right
    assert replay.last_proposed[in_shadow.name][1] == 4
    assert matches[in_shadow.name][0] == 0  # "a" has nothing ahead of it


@pytest.mark.parametrize("make", [SuffixDrafter, SuffixTreeDrafter])
def test_finished_siblings_stay_and_history_is_drafted_from(make: type[KeepsHistory]) -> None:
    shadow = lock_step_shadow([make()])
    traces = {t.key: t for t in shadow.traces()}
    replay = LiveReplay(shadow, [make()], max_k=4)
    replay([(traces["a"], 4), (traces["b"], 4)])
    replay([(traces["b"], 4)])  # "a" finished: its whole response is indexed as it leaves
    assert replay([(traces["b"], 4)])[make().name] == [4]
    earlier = {"g": [PROMPT[-2:] + RESPONSE]}  # the previous iteration's rollout
    with_history = LiveReplay(shadow, [make()], max_k=4, history=earlier)
    assert with_history([(traces["a"], 4), (traces["b"], 4)])[make().name] == [4, 4]


@pytest.mark.parametrize("make", [SuffixDrafter, SuffixTreeDrafter])
def test_clear_forgets_every_rollout_and_fresh_keeps_settings(make: type[KeepsHistory]) -> None:
    drafter = make()
    assert isinstance(drafter, KeepsHistory)
    drafter.observe([row("a", len(RESPONSE))])
    drafter.add_history("g", [PROMPT[-2:] + RESPONSE])
    assert drafter.propose([row("b", 4)], 4) == [RESPONSE[4:8]]
    drafter.clear()
    assert drafter.propose([row("c", 4)], 4) == [[]]
    copy = drafter.fresh()
    assert type(copy) is type(drafter) and copy is not drafter
    assert copy.propose([row("d", 4)], 4) == [[]]


def test_iteration_traces_replays_the_history_drafters_live() -> None:
    suffix, tree = SuffixDrafter(min_match=1), SuffixTreeDrafter()
    shadow = lock_step_shadow([suffix, tree])
    its = iteration_traces(shadow, [suffix, tree], max_k=4, history=None)
    assert all(not t.matches for t in its.traces)  # neither is read from the static drafts
    dynamic = its.dynamic()
    assert dynamic is not None
    by_key = {t.key: t for t in its.traces}
    out = dynamic([(by_key["a"], 8), (by_key["b"], 4)])
    assert set(out) == {"suffix", "suffix_tree"} and out["suffix_tree"][1] == 4
    assert out["suffix"][1] == 4
    # Each replay starts from fresh drafters with the engine's settings, not the shadow's.
    again = its.dynamic()
    assert again is not dynamic and again is not None
    assert again([(by_key["b"], 4)])["suffix"] == [0]
    assert iteration_traces(shadow, [], max_k=4, history=None).dynamic() is None


@pytest.mark.parametrize("make", [SuffixDrafter, SuffixTreeDrafter])
def test_a_fork_drafts_as_the_replay_it_was_forked_from(make: type[KeepsHistory]) -> None:
    shadow = lock_step_shadow([make()])
    traces = {t.key: t for t in shadow.traces()}
    earlier = {"g": [PROMPT[-2:] + RESPONSE[:5] + [9, 9]]}
    replay = LiveReplay(shadow, [make()], max_k=4, history=earlier)
    replay([(traces["a"], 2), (traces["b"], 1)])
    replay([(traces["a"], 6), (traces["b"], 2)])
    fork = replay.fork()
    # Both branches go on from the same state: same drafts for the same schedule...
    step = [(traces["b"], 3)]  # "a" finished meanwhile: its response joins the index
    name = make().name
    assert fork(step) == replay(step)
    assert fork.last_drafts == replay.last_drafts
    # Drafted from the index: the finished "a" and the history agree on the next two tokens.
    assert replay.last_drafts[name][0][:2] == RESPONSE[3:5]
    # ...and a branch's own steps do not reach the other.
    branch = replay.fork()
    branch([(traces["b"], 7)])
    assert replay([(traces["b"], 4)]) == fork([(traces["b"], 4)])
