"""Suffix drafter: draft from sibling samples of the same prompt and from earlier rollouts of it.

Where it sits: a candidate drafter of the adaptive proposer
(``generation.proposer.AdaptiveProposer``). RLHF samples n responses per prompt and revisits
prompts every epoch; responses to the same prompt share long stretches. Published RL systems
draft from exactly that: Seer's grouped speculative decoding from sibling responses, DAS's
suffix tree over recent rollouts of the same problem, SPEC-RL's previous-epoch rollout as the
draft. Model-free: the cost is a dict lookup.

How: per prompt group, every sequence (live siblings as they grow, finished siblings, and the
last ``history_iterations`` iterations' rollouts) is indexed by its ``min_match``-grams. A row
looks up its own tail, extends each hit backwards to the longest match, and proposes what
followed the best hit (longest match, then most recent). vLLM's own ``suffix`` method needs
arctic-inference and cannot see sibling requests' groups; this one reads the group key from
the request (``DraftRow.group``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rlhfspec_api.generation import DrafterSpec

from .base import DrafterEntry, DraftRow

NAME = "suffix"
MAX_MATCH = 32  # longest match worth extending to; beyond this more context rarely helps
MAX_CANDIDATES = 64  # hits examined per lookup, most recent first (bounds the per-row cost)


@dataclass
class _Group:
    """All indexed sequences of one prompt group."""

    n: int
    seqs: list[list[int]] = field(default_factory=list)
    grams: dict[tuple[int, ...], list[tuple[int, int]]] = field(default_factory=dict)
    """n-gram -> (sequence index, position right after the n-gram), in insertion order."""
    current: list[int] = field(default_factory=list)
    """Indices of this iteration's sequences (live or finished)."""
    history: deque[list[list[int]]] = field(default_factory=deque)
    """Earlier iterations' sequences, oldest first."""

    def add_sequence(self, tokens: Sequence[int]) -> int:
        self.seqs.append([])
        idx = len(self.seqs) - 1
        self.extend(idx, tokens)
        return idx

    def extend(self, idx: int, tokens: Sequence[int]) -> None:
        seq = self.seqs[idx]
        old = len(seq)
        seq.extend(int(t) for t in tokens)
        for end in range(max(old, self.n), len(seq) + 1):
            self.grams.setdefault(tuple(seq[end - self.n : end]), []).append((idx, end))

    def rebuild(self) -> None:
        """Re-index from history only (after an iteration ends)."""
        self.seqs, self.grams, self.current = [], {}, []
        for iteration in self.history:
            for tokens in iteration:
                self.add_sequence(tokens)

    def lookup(self, tail: Sequence[int], k: int, exclude: int) -> list[int]:
        hits = self.grams.get(tuple(tail[-self.n :]))
        if not hits:
            return []
        best: tuple[int, int, int] | None = None  # (match length, seq index, end)
        for seq_idx, end in reversed(hits[-MAX_CANDIDATES:]):
            seq = self.seqs[seq_idx]
            if seq_idx == exclude or end >= len(seq):
                continue  # own sequence, or nothing follows the hit yet
            match = self.n
            limit = min(MAX_MATCH, end, len(tail))
            while match < limit and seq[end - match - 1] == tail[-match - 1]:
                match += 1
            if best is None or match > best[0]:
                best = (match, seq_idx, end)
        if best is None:
            return []
        _, seq_idx, end = best
        return self.seqs[seq_idx][end : end + k]


class SuffixDrafter:
    """Grouped suffix matching over siblings and earlier iterations of each prompt."""

    name = NAME
    model_free = True
    """Drafting costs a lookup, not a forward: the adaptive policy also drafts with it on the
    side to keep its acceptance estimate fresh (proposer.ShadowEvidence)."""

    def __init__(self, min_match: int = 2, history_iterations: int = 1) -> None:
        if min_match < 1 or history_iterations < 0:
            raise ValueError(f"bad suffix settings: {min_match=}, {history_iterations=}")
        self.min_match, self.history_iterations = min_match, history_iterations
        self.groups: dict[str, _Group] = {}
        self.live: dict[str, tuple[str, int, int]] = {}
        """req_id -> (group, sequence index, token offset of the sequence in the row)."""

    @classmethod
    def from_spec(cls, spec: DrafterSpec) -> SuffixDrafter:
        return cls(spec.min_match, spec.history_iterations)

    def _group(self, key: str) -> _Group:
        if key not in self.groups:
            self.groups[key] = _Group(self.min_match)
        return self.groups[key]

    def observe(self, rows: Sequence[DraftRow]) -> None:
        """Index the rows' new tokens. Called every step for every row, whichever drafter is
        chosen, so siblings stay searchable while another drafter (or none) is in use."""
        for row in rows:
            entry = self.live.get(row.req_id)
            if entry is None:
                group = self._group(row.group)
                # Keep a short prompt tail so a fresh sibling's first tokens can match too.
                offset = max(0, row.prompt_len - self.min_match)
                idx = group.add_sequence(row.tokens[offset:].tolist())
                group.current.append(idx)
                self.live[row.req_id] = (row.group, idx, offset)
            else:
                key, idx, offset = entry
                group = self.groups[key]
                have = offset + len(group.seqs[idx])
                if len(row.tokens) > have:
                    group.extend(idx, row.tokens[have:].tolist())

    def propose(self, rows: Sequence[DraftRow], k: int) -> list[list[int]]:
        self.observe(rows)
        drafts: list[list[int]] = []
        for row in rows:
            key, idx, _ = self.live[row.req_id]
            kk = min(k, row.max_k)
            tail = row.tokens[-MAX_MATCH:].tolist()
            drafts.append(self.groups[key].lookup(tail, kk, idx) if kk > 0 else [])
        return drafts

    def release(self, req_ids: Iterable[str]) -> None:
        # The sequence stays indexed as a finished sibling; only the live mapping goes.
        for req_id in req_ids:
            self.live.pop(req_id, None)

    def add_history(self, group: str, sequences: Iterable[Sequence[int]]) -> None:
        """Index rollouts of ``group`` from elsewhere (another worker, a restored checkpoint)
        as part of the newest finished iteration."""
        g = self._group(group)
        seqs = [list(map(int, s)) for s in sequences]
        if not g.history:
            g.history.append([])
        g.history[-1].extend(seqs)
        for s in seqs:
            g.add_sequence(s)

    def clear(self) -> None:
        self.groups.clear()
        self.live.clear()

    def fresh(self) -> SuffixDrafter:
        return SuffixDrafter(self.min_match, self.history_iterations)

    def new_iteration(self) -> None:
        """Close the current RL iteration: its sequences become history, the oldest history
        beyond ``history_iterations`` is dropped. Call between iterations (no live rows)."""
        for key in list(self.groups):
            g = self.groups[key]
            g.history.append([g.seqs[i] for i in g.current])
            while len(g.history) > self.history_iterations:
                g.history.popleft()
            g.rebuild()
            if not g.seqs:
                del self.groups[key]
        self.live.clear()


# No vLLM-native baseline: vLLM's own suffix method needs the arctic-inference package.
ENTRY = DrafterEntry(NAME, build=lambda context: SuffixDrafter.from_spec(context.spec), native=None)
