"""Shadow drafting: every drafter's longest draft for every row at every step, kept aside.

Where it sits: the generation benchmark sets ``AdaptiveProposer.shadow`` to a
:class:`ShadowDrafts` for one run with a policy that drafts nothing (plain decoding through
the proposer). The proposer then asks each drafter for ``max_k`` tokens per row every step
and hands them here instead of to vLLM, so decoding is unchanged and every position of every
sequence gets a proposal from every drafter. Once the run is over, :meth:`ShadowDrafts.traces`
compares each proposal with what the sequence really generated next and gives the
``spec_decode.hindsight`` replay its match lengths.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from rlhfspec_workers.drafters.base import DraftRow, KeepsHistory, TokenArray
from rlhfspec_workers.spec_decode.hindsight import Live, SequenceTrace, match_length


class ShadowDrafts:
    """Proposals recorded per request and position, and each request's tokens so far."""

    def __init__(self) -> None:
        self.proposals: dict[str, dict[int, dict[str, list[int]]]] = {}
        """req_id -> response tokens out when drafting -> drafter -> draft."""
        self.latest: dict[str, tuple[TokenArray, int]] = {}
        """req_id -> (prompt + response tokens last seen, prompt length)."""
        self.groups: dict[str, str] = {}
        self.caps: dict[str, dict[int, int]] = {}
        """req_id -> response tokens out -> the most draft tokens the row could take then."""

    def record(self, rows: Sequence[DraftRow], drafts: Mapping[str, list[list[int]]]) -> None:
        for i, row in enumerate(rows):
            out = len(row.tokens) - row.prompt_len
            if out < 1:  # still prefilling: nothing sampled yet, nothing to draft after
                continue
            self.latest[row.req_id] = (row.tokens, row.prompt_len)
            self.groups[row.req_id] = row.group
            self.caps.setdefault(row.req_id, {})[out] = row.max_k
            at = self.proposals.setdefault(row.req_id, {}).setdefault(out, {})
            for drafter, per_row in drafts.items():
                at[drafter] = list(per_row[i])

    def response(self, req_id: str) -> list[int]:
        tokens, prompt_len = self.latest[req_id]
        return [int(t) for t in tokens[prompt_len:]]

    def traces(self, exclude: Iterable[str] = ()) -> list[SequenceTrace]:
        """One trace per request, with the match lengths of every drafter not in
        ``exclude`` (those whose drafts depend on the schedule are replayed live instead)."""
        skip = set(exclude)
        traces = []
        for req_id, by_position in self.proposals.items():
            response = self.response(req_id)
            start = min(by_position)
            drafters = sorted({d for at in by_position.values() for d in at} - skip)
            matches = {
                d: [
                    match_length(by_position.get(pos, {}).get(d, ()), response[pos:])
                    for pos in range(start, len(response))
                ]
                for d in drafters
            }
            proposed = {
                d: [len(by_position.get(pos, {}).get(d, ())) for pos in range(start, len(response))]
                for d in drafters
            }
            traces.append(SequenceTrace(req_id, start, len(response), matches, proposed))
        return traces


class LiveReplay:
    """The history-keeping drafters (``suffix``, ``suffix_tree``) re-run inside a replay (a
    ``hindsight.Dynamic``).

    Their drafts depend on how far each sibling has got: in the plain-decoding shadow run
    siblings advance in lock step, so a sibling is never ahead to draft from, while under a
    drafting schedule the ones that accept more run ahead and draft for the rest. So the
    replay feeds fresh drafters every sequence's real tokens up to where the *replayed*
    schedule has it, step by step, and scores their drafts against what followed. Read from
    the shadow run's static drafts instead, ``suffix_tree`` replayed 1.2-1.3x what its fixed
    runs measured on SmolLM2 (its drafts there came from a tree fed in lock step, by a run
    that also kept every earlier run's rollouts). One instance per replay."""

    def __init__(
        self,
        shadow: ShadowDrafts,
        drafters: Sequence[KeepsHistory],
        max_k: int,
        history: Mapping[str, Sequence[Sequence[int]]] | None = None,
    ) -> None:
        self.shadow, self.drafters, self.max_k = shadow, list(drafters), max_k
        self.history = history
        for drafter in self.drafters:
            for group, sequences in (history or {}).items():
                drafter.add_history(group, sequences)
        self.live: set[str] = set()
        self.responses = {key: shadow.response(key) for key in shadow.latest}
        self.calls: list[list[tuple[str, int]]] = []
        """Every call's live sequences and positions: a fork re-feeds them."""
        self.last_drafts: dict[str, list[list[int]]] = {}
        """The last call's draft per live sequence, per drafter."""

    def _row(self, key: str, out: int) -> DraftRow:
        tokens, prompt_len = self.shadow.latest[key]
        cap = self.shadow.caps[key].get(out, 0)
        return DraftRow(key, tokens[: prompt_len + out], prompt_len, self.shadow.groups[key], cap)

    def _feed(self, live: Sequence[tuple[str, int]]) -> list[DraftRow]:
        """Index what every sequence has reached (finished ones whole) and return the live
        rows; what ``propose`` does before it looks anything up."""
        self.calls.append(list(live))
        keys = {key for key, _ in live}
        ended = sorted(self.live - keys)
        self.live = keys
        rows = [self._row(key, pos) for key, pos in live]
        # Sequences that ended: their last tokens are indexed as finished siblings, as the
        # engine would.
        finished = [self._row(k, len(self.responses[k])) for k in ended]
        for drafter in self.drafters:
            if finished:
                drafter.observe(finished)
                drafter.release(ended)
        return rows

    def fork(self) -> LiveReplay:
        """A copy in this state (the oracle's lookahead branches the schedule): fresh drafters
        on the same history, fed every call so far. Drafting is a lookup on what was fed, so
        feeding alone reproduces the state."""
        copy = LiveReplay(self.shadow, [d.fresh() for d in self.drafters], self.max_k, self.history)
        for live in self.calls:
            rows = copy._feed(live)
            for drafter in copy.drafters:
                drafter.observe(rows)
        return copy

    def __call__(self, live: Live) -> Mapping[str, Sequence[int]]:
        rows = self._feed([(seq.key, pos) for seq, pos in live])
        matches: dict[str, list[int]] = {}
        for drafter in self.drafters:
            drafts = drafter.propose(rows, self.max_k)
            self.last_drafts[drafter.name] = drafts
            matches[drafter.name] = [
                match_length(draft, self.responses[seq.key][pos:])
                for draft, (seq, pos) in zip(drafts, live, strict=True)
            ]
        return matches

    @property
    def last_proposed(self) -> dict[str, list[int]]:
        """The last call's draft length per live sequence, per drafter (a replayed selector's
        fill)."""
        return {name: [len(d) for d in drafts] for name, drafts in self.last_drafts.items()}
