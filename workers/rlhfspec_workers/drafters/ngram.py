"""Prompt-lookup (n-gram) drafter: continue the latest earlier occurrence of the context's tail.

Where it sits: a candidate drafter of the adaptive proposer
(``generation.proposer.AdaptiveProposer``), chosen per step by the policy; also the
vLLM-native ``ngram`` baseline config (:func:`speculative_config`). Model-free and nearly free
to run, so it pays off whenever outputs copy from the prompt or repeat themselves. Our own
search instead of vLLM's numba kernel: it runs per row inside the adaptive proposer, with no
numba thread pool to spin beside the engine (``docs/cpu-notes.md`` section 1). ``lookup`` is
the definition (a scan of the whole context); the drafter keeps, per request, an index that
grows with it and drafts exactly what ``lookup`` would, for a few dict reads a row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from rlhfspec_api.generation import DrafterSpec

from .base import DrafterEntry, DraftRow, NativeContext, TokenArray

NAME = "ngram"


def lookup(tokens: TokenArray, k: int, min_n: int, max_n: int) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the longest tail n-gram.

    Tries n = max_n down to min_n; the first n with a match wins (longer context, better
    guess), and among its matches the latest one (recent text predicts best).
    """
    length = len(tokens)
    if k <= 0:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = tokens[length - n :]
        # Windows starting at 0..length-n-1: each has at least one token after it.
        windows = sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in tokens[start : start + k]]
    return []


class _RowIndex:
    """One request's n-grams, each mapped to its latest start that has a token after it.

    Built as the request grows (a few dict writes per new token), so a step's lookup is
    max_n - min_n + 1 dict reads per row instead of as many scans of the whole context:
    ``lookup`` over the 64 rows of a tiny-bench batch cost ~0.6 ms a step."""

    __slots__ = ("last", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.last: dict[tuple[int, ...], int] = {}
        """n-gram (any n in min_n..max_n; lengths keep them apart) -> latest start."""

    def matches(self, tokens: TokenArray) -> bool:
        """Whether ``tokens`` extends what was indexed (else the index is rebuilt). A request
        id names one request and its tokens only grow; the length and last-token check
        catches an id reused for other tokens. Missing one could only make drafts worse,
        never the output wrong: verification rejects what the target would not sample."""
        seen = len(self.tokens)
        return len(tokens) >= seen and (seen == 0 or int(tokens[seen - 1]) == self.tokens[-1])

    def extend(self, tokens: TokenArray, min_n: int, max_n: int) -> None:
        """Index the windows that now have a token after them: starts s with s + n up to
        len(tokens) - 1, as ``lookup`` scans them."""
        old = len(self.tokens)
        if len(tokens) == old:
            return
        self.tokens.extend(tokens[old:].tolist())
        seq, last = self.tokens, self.last
        for follower in range(max(old, 1), len(seq)):
            for n in range(min_n, min(max_n, follower) + 1):
                last[tuple(seq[follower - n : follower])] = follower - n

    def draft(self, k: int, min_n: int, max_n: int) -> list[int]:
        seq, length = self.tokens, len(self.tokens)
        for n in range(min(max_n, length - 1), min_n - 1, -1):
            start = self.last.get(tuple(seq[length - n :]))
            if start is not None:
                return seq[start + n : start + n + k]
        return []


class NgramDrafter:
    """Prompt lookup over each request's own prompt + output (``lookup``, kept per request
    as an index that grows with it)."""

    name = NAME
    model_free = True
    """Drafting costs a lookup, not a forward: the adaptive policy also drafts with it on the
    side to keep its acceptance estimate fresh (proposer.ShadowEvidence)."""

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._rows: dict[str, _RowIndex] = {}

    @classmethod
    def from_spec(cls, spec: DrafterSpec) -> NgramDrafter:
        return cls(spec.prompt_lookup_min, spec.prompt_lookup_max)

    def propose(self, rows: Sequence[DraftRow], k: int) -> list[list[int]]:
        out: list[list[int]] = []
        for r in rows:
            cap = min(k, r.max_k)
            if cap <= 0:
                out.append([])
                continue
            index = self._rows.get(r.req_id)
            if index is None or not index.matches(r.tokens):
                index = self._rows[r.req_id] = _RowIndex()
            index.extend(r.tokens, self.min_n, self.max_n)
            out.append(index.draft(cap, self.min_n, self.max_n))
        return out

    def release(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self._rows.pop(req_id, None)


def speculative_config(spec: DrafterSpec, num_tokens: int) -> dict[str, Any]:
    """vLLM-native prompt lookup (baseline): fixed k, vLLM's numba matcher."""
    return {
        "method": "ngram",
        "num_speculative_tokens": num_tokens,
        "prompt_lookup_min": spec.prompt_lookup_min,
        "prompt_lookup_max": spec.prompt_lookup_max,
    }


def _native(context: NativeContext) -> dict[str, Any]:
    config = speculative_config(context.spec, context.num_tokens)
    if context.per_batch_size is not None:
        config["num_speculative_tokens_per_batch_size"] = [list(r) for r in context.per_batch_size]
    return config


ENTRY = DrafterEntry(
    NAME, build=lambda context: NgramDrafter.from_spec(context.spec), native=_native
)
