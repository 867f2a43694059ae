"""Drafting strategies: what the adaptive proposer asks every step for (drafter, k).

Where it sits: ``proposer.AdaptiveProposer`` calls ``strategy.choose(batch_size)`` once per
decode step, right before drafting, and ``strategy.observe(feedback)`` with the outcome of the
previous step's drafts (how many vLLM verified and accepted, per position, and how long the
step took). The selector of ``rlhfspec_workers.spec_decode`` plugs in through
:class:`SelectorStrategy`; the simple strategies here serve fixed mode, tests and benchmarks.
Policies run inside vLLM's model runner, so they must be cheap (microseconds) and never raise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator, StepStats
from rlhfspec_workers.spec_decode.cost_records import OFF as OFF  # re-exported
from rlhfspec_workers.spec_decode.draft_choice import NO_DRAFT as NO_DRAFT  # re-exported
from rlhfspec_workers.spec_decode.draft_choice import BatchRange
from rlhfspec_workers.spec_decode.draft_choice import DraftChoice as DraftChoice  # re-exported
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector, Candidate, ScoredChoice


@dataclass(frozen=True)
class StepFeedback:
    """How the drafts of one step fared, as the proposer saw them at the next step."""

    choice: DraftChoice
    """The strategy that produced the drafts."""
    batch_size: int
    """Requests decoding when the drafts were made."""
    num_drafts: int
    """Requests that received at least one draft token and were verified."""
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_pos: tuple[int, ...]
    """accepted_per_pos[i]: drafts whose token i was accepted (non-increasing in i)."""
    step_seconds: float
    """Wall time from that drafting call to the next one: verification of these drafts plus
    everything else the engine did in between (scheduling, sampling, next drafting excluded)."""
    draft_seconds: float
    """Time spent producing these drafts."""
    shadow: Mapping[str, ShadowEvidence] = field(default_factory=dict)
    """Drafters that were not chosen but drafted on the side (model-free, so nearly free),
    scored against the tokens the target emitted: drafter -> evidence."""
    fill: Mapping[str, DraftFill] = field(default_factory=dict)
    """How full the drafts of this step's drafters (chosen and side) were."""
    rows_asked: int = -1
    """Rows the chosen drafter was asked to draft for that were still running when its
    drafts were verified: the drafts' denominator (-1: not counted; ``batch_size`` stands in).
    Rows that finished in between were never verified, and rows without room for a draft
    were never asked: counted as rejected drafts they pulled the tiny bench's draft-model
    estimate to 0.55 at position 1 where its tail accepted ~0.7."""
    trials_per_pos: tuple[int, ...] = ()
    """trials_per_pos[i]: rows asked whose draft was checked at position i: every row asked
    at i = 0, deeper the rows whose tokens before i were all accepted and whose room let the
    draft reach i (a row one token from its cap is no evidence at position 2). Empty: the
    estimator derives them from ``accepted_per_pos`` (every row as if it had room for k)."""


def count_verified_row(
    accepted_per_pos: list[int], trials_per_pos: list[int], cap: int, accepted: int
) -> None:
    """One row asked for a draft, into a step's per-position counts (``StepFeedback``):
    position 0 is a trial for every row asked (no draft counts as rejected there); position
    p > 0 only where the row accepted the p tokens before it and its ``cap`` (min(k, room))
    let the draft reach p. ``accepted``: of the row's draft, at most its length."""
    trials_per_pos[0] += 1
    for p in range(accepted):
        accepted_per_pos[p] += 1
    for p in range(1, min(accepted + 1, cap)):
        trials_per_pos[p] += 1


@dataclass(frozen=True)
class DraftFill:
    """``asked[i]``: rows asked for more than i draft tokens; ``got[i]``: how many of them
    were proposed more than i. A model-free drafter drafts only where it finds a match."""

    asked: tuple[int, ...]
    got: tuple[int, ...]


@dataclass(frozen=True)
class ShadowEvidence:
    """A side draft's outcome, per position: ``trials[i]`` rows whose position i could be
    checked against an emitted token, ``successes[i]`` of them equal to it.

    Emitted tokens are distributed exactly as plain sampling (verification is lossless), so
    a deterministic draft token matches the emitted one with exactly the probability that
    verification would have accepted it: unbiased evidence for a drafter nobody ran. A step
    emits 1 + accepted tokens per row, so deeper positions are seen only when the chosen
    drafter got that far (censored, never counted as rejections)."""

    trials: tuple[int, ...]
    successes: tuple[int, ...]


class DraftStrategy(Protocol):
    def choose(self, batch_size: int) -> DraftChoice: ...

    def observe(self, feedback: StepFeedback) -> None: ...


@runtime_checkable
class ChoosesWithDrafts(Protocol):
    """A strategy that scores model-free drafters on drafts made before it chooses
    (``spec_decode.in_hand``; ``adaptive.AdaptiveStrategy``)."""

    def drafters_in_hand(self, batch_size: int, model_free: Sequence[str]) -> list[str]:
        """Which of the ``model_free`` drafters to draft with for every row first."""
        ...

    def choose_with_drafts(
        self,
        batch_size: int,
        lengths: Mapping[str, Sequence[int]],
        rooms: Sequence[int] | None = None,
    ) -> DraftChoice:
        """This step's choice; ``lengths``: per drafter in hand (possibly none), its draft's
        length for each row asked (rows with room for a draft, in batch order); ``rooms``:
        the draft tokens each row of the batch can take before its cap (0: none)."""
        ...


@dataclass
class FixedStrategy:
    """Always the same strategy (``speculative.mode: fixed``; ``OFF``/0 for plain decoding)."""

    choice: DraftChoice

    def choose(self, batch_size: int) -> DraftChoice:
        return self.choice

    def observe(self, feedback: StepFeedback) -> None:
        pass


@dataclass
class BatchSizeStrategy:
    """A strategy per batch-size range, like vLLM's ``num_speculative_tokens_per_batch_size``
    but able to change the drafter too: ``[BatchRange(lo, hi, drafter, k), ...]``, inclusive
    ranges; batch sizes outside every range get plain decoding."""

    table: Sequence[BatchRange]

    def choose(self, batch_size: int) -> DraftChoice:
        for row in self.table:
            if row.covers(batch_size):
                return row.choice
        return NO_DRAFT

    def observe(self, feedback: StepFeedback) -> None:
        pass


@dataclass
class ScriptedStrategy:
    """``choose`` from a function of (call index, batch size); records every call and every
    feedback. For tests and calibration runs that need a known, changing schedule."""

    script: Callable[[int, int], DraftChoice]
    calls: list[tuple[int, DraftChoice]] = field(default_factory=list)
    feedback: list[StepFeedback] = field(default_factory=list)

    def choose(self, batch_size: int) -> DraftChoice:
        choice = self.script(len(self.calls), batch_size)
        self.calls.append((batch_size, choice))
        return choice

    def observe(self, feedback: StepFeedback) -> None:
        self.feedback.append(feedback)


class SelectorStrategy:
    """``spec_decode``'s AdaptiveSelector + one AcceptanceEstimator per drafter, as a strategy.

    Feedback -> estimator: a step's drafts become one ``StepStats`` of the drafter used. Rows
    asked for a draft that got none (a model-free drafter found no match) count as drafts
    rejected at position 0: the selector's throughput model multiplies expected acceptance by
    the batch size, so coverage must be part of a drafter's acceptance. Rows never verified
    (finished before it) or never asked (no room left) are no evidence either way.
    """

    wants_side_drafts = True
    """Model-free drafters not chosen draft on the side (StepFeedback.shadow): their
    acceptance stays measured while another strategy, or none, is in use."""

    def __init__(
        self, selector: AdaptiveSelector, estimators: Mapping[str, AcceptanceEstimator]
    ) -> None:
        self.selector = selector
        self.estimators = dict(estimators)
        self.expected_accepted = -1.0
        """Draft tokens the last choice was expected to get accepted, per row of the batch
        (what the selector scored it by; -1 when it drafts nothing). The proposer records
        it with the step (``StepRecord.next_expected_accepted``), so that what the selector
        believed can be held against what the next step accepted."""

    def choose(self, batch_size: int) -> DraftChoice:
        if batch_size < 1:
            return NO_DRAFT
        candidates = [Candidate(name, est) for name, est in self.estimators.items()]
        scored = self.selector.select(batch_size, candidates)
        return self.chose(scored, candidates)

    def chose(self, scored: ScoredChoice, candidates: Sequence[Candidate]) -> DraftChoice:
        """Keep what ``scored`` was expected to accept (:attr:`expected_accepted`) and return
        it as a choice."""
        self.expected_accepted = -1.0
        if not scored.enabled:
            return NO_DRAFT
        for candidate in candidates:
            if candidate.drafter == scored.drafter:
                self.expected_accepted = candidate.acceptance.expected_accepted(scored.k)
        return scored.strategy

    def drafter_changed(self, name: str) -> None:
        """``name`` drafts with new weights (a refreshed draft): what was measured of the old
        ones says nothing of them, so its estimate starts again from its prior. Otherwise a
        draft that collapsed while stale would never be tried again after its refresh."""
        estimator = self.estimators.get(name)
        if estimator is not None:
            estimator.forget(0.0)

    def observe(self, feedback: StepFeedback) -> None:
        fold_feedback(feedback, self.estimators)


def fold_feedback(feedback: StepFeedback, estimators: Mapping[str, AcceptanceEstimator]) -> None:
    """One step's outcome into the estimators it concerns: every drafter's fill, the side
    drafters' evidence, and the chosen drafter's verified drafts (see SelectorStrategy)."""
    for name, fill in feedback.fill.items():
        estimator = estimators.get(name)
        if estimator is not None:
            estimator.update_fill(fill.asked, fill.got)
    for name, evidence in feedback.shadow.items():
        side = estimators.get(name)
        if side is not None and evidence.trials and evidence.trials[0] > 0:
            side.update_positions(
                evidence.trials, evidence.successes, float(sum(evidence.successes))
            )
    estimator = estimators.get(feedback.choice.drafter)
    if estimator is None or not feedback.choice.enabled or feedback.batch_size < 1:
        return
    asked = feedback.rows_asked if feedback.rows_asked >= 0 else feedback.batch_size
    rows = max(asked, feedback.num_drafts)
    if rows == 0:
        return
    if feedback.trials_per_pos:
        trials = [rows, *feedback.trials_per_pos[1:]]
        successes = [min(s, n) for s, n in zip(feedback.accepted_per_pos, trials, strict=False)]
        estimator.update_positions(
            trials[: len(successes)], successes, float(feedback.num_accepted_tokens)
        )
        return
    estimator.update(
        StepStats(
            num_drafts=rows,
            num_draft_tokens=rows * feedback.choice.k,
            num_accepted_tokens=feedback.num_accepted_tokens,
            accepted_per_pos=feedback.accepted_per_pos,
            draft_len=feedback.choice.k,
        )
    )
