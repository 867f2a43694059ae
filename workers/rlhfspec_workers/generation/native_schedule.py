"""Our selector's choice carried by vLLM's native speculative path: k per batch size, rewritten
as the engine runs.

Where it sits: a ``GenerationEngine`` built with ``native=True`` and a ``per_batch_size``
table runs vLLM's own drafter (``draft_model`` or ``ngram``) with vLLM's Dynamic SD: the
scheduler reads a dense lookup, batch size -> k, at every step. ``engine.set_native_schedule``
hands that lookup to a :class:`NativeSchedule`; after every engine step the schedule folds the
step's record (vLLM's own acceptance counters, per position) into an ``AdaptiveStrategy``'s
estimates and rewrites the lookup around the batch's size with the selector's best k there.
Pure Python: the engine owns the lookup and passes it in.

Why: vLLM's native path runs its draft model with its own kernels (on a GPU: paged attention
and CUDA graphs, where the proposer path's hand-written draft forward, ``drafters/
llama_forward.py``, has neither), and it does no per-step Python of ours. Where the choice is
only k for one drafter, the native path can carry it. What it cannot carry, and the proposer
path keeps: switching between drafters, drafts in hand, drafting on the side.

Unlike the proposer path, the choice is made before the step for the batch size it will have
(one lookup per size) and without hysteresis: each entry is the selector's best there on the
current estimates (``AdaptiveStrategy.best_at``). The schedule learns acceptance only; the
table it prices with is the strategy's (``native_setup``: whole native steps, the drafter
free, refined by the strategy's cost learner from the same step records).
"""

from __future__ import annotations

from collections.abc import MutableSequence

from .adaptive import AdaptiveStrategy
from .draft_strategy import DraftChoice, StepFeedback
from .records import StepRecord

WINDOW = 4
"""Entries rewritten around the batch's size after each step: the next step's batch is this
one less what finishes (or more, when samples arrive), rarely more than a few away."""


class NativeSchedule:
    """The lookup of one native drafter, kept at the selector's best k per batch size."""

    def __init__(self, strategy: AdaptiveStrategy, drafter: str, *, window: int = WINDOW) -> None:
        if drafter not in strategy.estimators:
            have = sorted(strategy.estimators)
            raise ValueError(f"the strategy has no estimate of {drafter!r} (it has {have})")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.strategy, self.drafter, self.window = strategy, drafter, window
        self.rewrites = 0
        """Entries changed so far (for reports and tests)."""

    def k_at(self, batch_size: int) -> int:
        """The k to draft at ``batch_size``: the selector's best, 0 where it would not draft
        with this drafter."""
        choice = self.strategy.best_at(batch_size)
        return choice.k if choice.enabled and choice.drafter == self.drafter else 0

    def fill(self, lookup: MutableSequence[int]) -> None:
        """Every entry (index = batch size; index 0 unused, as vLLM's lookup has it)."""
        self._write(lookup, range(1, len(lookup)))

    def observe(self, step: StepRecord, lookup: MutableSequence[int]) -> None:
        """One native engine step: its drafts' outcome into the estimates, then the entries
        around its batch size rewritten."""
        if step.batch_size < 1:
            return
        if step.k > 0 and step.prefill_tokens == 0:
            self.strategy.observe(feedback_of(step, self.drafter))
        lo = max(1, step.batch_size - self.window)
        hi = min(len(lookup) - 1, step.batch_size + self.window)
        self._write(lookup, range(lo, hi + 1))

    def _write(self, lookup: MutableSequence[int], sizes: range) -> None:
        for b in sizes:
            k = self.k_at(b)
            if lookup[b] != k:
                lookup[b] = k
                self.rewrites += 1


def feedback_of(step: StepRecord, drafter: str) -> StepFeedback:
    """A native step's record as the feedback the proposer would have given: vLLM counts the
    drafts it verified and, per position, how many were accepted there."""
    return StepFeedback(
        choice=DraftChoice(drafter, step.k),
        batch_size=step.batch_size,
        num_drafts=step.num_drafts,
        num_draft_tokens=step.num_draft_tokens,
        num_accepted_tokens=step.num_accepted_tokens,
        accepted_per_pos=tuple(step.accepted_per_pos[: step.k]),
        step_seconds=step.step_seconds,
        draft_seconds=step.draft_seconds,
        rows_asked=step.num_drafts,
    )
