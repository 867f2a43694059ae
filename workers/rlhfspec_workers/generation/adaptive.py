"""Adaptive speculative decoding, wired for real: cost table, per-step strategy, coordinator hooks.

Where it sits: a generation worker builds its ``GenerationEngine`` and then, once, calls
:func:`make_strategy` and installs the result (``engine.set_strategy``). In adaptive mode that

1. loads the cost table of (policy model, hardware) from the calibration cache, or measures it
   on the running engine within a time budget (``calibrate.py``: the verification grid of
   ``spec_decode.calibration_plan`` and each drafter's cost; what the budget does not reach
   is fitted) and stores it (:func:`calibrated_cost_model`);
2. builds :class:`AdaptiveStrategy` (:func:`build_adaptive_strategy`): one
   ``AcceptanceEstimator`` per drafter, with priors and the spec's half-life in decode steps,
   an ``AdaptiveSelector`` with the spec's hysteresis, and a :class:`CostLearner` that keeps
   refining the cost table from the engine's real steps and writes it back to the cache now
   and then.

Every decode step the proposer asks the strategy for (drafter, k) and feeds back how the previous
step's drafts fared; the worker passes every engine step's record to
:meth:`AdaptiveStrategy.observe_step` (``broadcast.StrategySync.observe``), which teaches the
cost table what steps really cost. While the job runs, the worker passes the coordinator's
broadcasts in:
:meth:`AdaptiveStrategy.apply_table` (a ``messages.StrategyTable``: the pooled choice per batch
bucket, used as the default that local evidence may override) and
:meth:`AdaptiveStrategy.set_pooled_acceptance` (acceptance pooled over all workers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rlhfspec_api.generation import GenerationSpec, SpeculativeMode, SpeculativeSpec
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers import messages
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator, BetaPrior
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import CostTableKey
from rlhfspec_workers.spec_decode.in_hand import DraftsInHand, RoomLimited
from rlhfspec_workers.spec_decode.phased import PhasedAcceptance, phase_of
from rlhfspec_workers.spec_decode.selector import (
    AdaptiveSelector,
    Candidate,
    ScoredChoice,
    SelectorInput,
    evaluate,
)
from rlhfspec_workers.spec_decode.selector import choose as choose_best

from .calibration_run import CALIBRATION_BUDGET_SECONDS
from .cost_cache import (
    cache_path,
    cached_cost_model,
    cost_table_key,
    default_cache_dir,
    store_cost_model,
)
from .cost_learner import CostLearner
from .cost_table import Log, calibrated_cost_model, uncalibrated_cost_model
from .draft_strategy import (
    NO_DRAFT,
    OFF,
    DraftChoice,
    DraftStrategy,
    FixedStrategy,
    SelectorStrategy,
    StepFeedback,
    fold_feedback,
)
from .records import StepRecord

if TYPE_CHECKING:  # the engine imports vLLM: strategies and their tests must not need it
    from .engine import GenerationEngine

__all__ = [
    "AdaptiveStrategy",
    "CostLearner",
    "CostTableKey",
    "build_adaptive_strategy",
    "calibrated_cost_model",
    "cost_table_key",
    "default_cache_dir",
    "estimator_from_rates",
    "expected_batch",
    "make_strategy",
]

PRIORS: dict[str, BetaPrior] = {
    # A trained draft model usually agrees with its target most of the time.
    "draft_model": BetaPrior(mean=0.6, strength=4.0, position_decay=0.95),
    # Model-free drafters: coverage (rows with no match count as rejected) keeps them lower.
    "suffix": BetaPrior(mean=0.4, strength=4.0, position_decay=0.95),
    "suffix_tree": BetaPrior(mean=0.3, strength=4.0, position_decay=0.9),
    "ngram": BetaPrior(mean=0.25, strength=4.0, position_decay=0.9),
}
PHASE_HALF_LIFE_DRAFTS = 1024.0
"""A phase's evidence halves every this many drafts made in that phase: a batch passes each
phase once per iteration, so this spans a few iterations of it."""
IDLE_HALF_LIFE_FACTOR = 4.0
"""A drafter not in use forgets its evidence this many times slower than one in use: its
estimate drifts back to the prior, so a drafter that looked bad is eventually retried."""


# -- the strategy -------------------------------------------------------------------------------


def estimator_from_rates(
    drafter: str, rates: Sequence[float], *, drafts: float = 64.0, like: AcceptanceEstimator | None
) -> AcceptanceEstimator:
    """An estimator holding ``drafts`` drafts' worth of evidence for the given per-position
    conditional acceptance rates (``messages.StrategyTable.acceptance``)."""
    est = AcceptanceEstimator(drafter) if like is None else like.copy()
    est.successes, est.trials = [], []
    reached = drafts
    for rate in rates:
        accepted = reached * min(max(float(rate), 0.0), 1.0)
        est.successes.append(accepted)
        est.trials.append(reached)
        reached = accepted
    est.drafts = drafts
    est.accepted_tokens = sum(est.successes)
    return est


class AdaptiveStrategy(SelectorStrategy):
    """The selector strategy of adaptive mode (see module docstring).

    Acceptance ages per decode step, as the spec says: the estimator of the drafter used in a
    step decays by 0.5 ** (1 / half_life_steps) whatever the batch size; estimators of drafters
    not in use decay ``IDLE_HALF_LIFE_FACTOR`` times slower, back towards their priors. The
    selector reads each drafter in the batch's phase (``spec_decode.phased``): the pooled
    estimate refined by what this worker saw at that batch size, with one standard deviation
    of optimism where it saw little.
    """

    def __init__(
        self,
        selector: AdaptiveSelector,
        estimators: Mapping[str, AcceptanceEstimator],
        *,
        half_life_steps: float = 64.0,
    ) -> None:
        super().__init__(selector, estimators)
        if half_life_steps <= 0:
            raise ValueError("half_life_steps must be > 0")
        self.half_life_steps = half_life_steps
        self.learner: CostLearner | None = None
        """Refines the selector's cost table from real engine steps (:meth:`observe_step`)."""
        self.table: messages.StrategyTable | None = None
        self.phases: dict[tuple[str, int], AcceptanceEstimator] = {}
        """(drafter, batch phase) -> that phase's evidence: the selector reads each drafter
        as its pooled estimate refined by the phase the batch is in (``spec_decode.phased``).
        Local to this worker; the pooled estimates are what workers share."""
        self._seeded: tuple[int, int, int] | None = None
        """(table version, bucket lo, bucket hi) whose entry the selector was last seeded with."""
        self.in_hand = True
        """Score model-free drafters on their drafts in hand where they could win
        (:meth:`drafters_in_hand`); False: on their estimates alone."""
        self._checked: tuple[int, dict[str, PhasedAcceptance]] | None = None
        """(phase, estimates) of the last in-hand check, for the choice right after it."""
        self.room_aware = True
        """Score drafters on the batch's rooms where the proposer passes them (rows near
        their cap take short drafts or none: ``spec_decode.in_hand.RoomLimited``), and read
        no evidence from draft positions a row had no room for (``trials_per_pos``); False:
        every row of the batch counts as taking a full draft, in both."""

    # -- per step ---------------------------------------------------------------------------

    def _phased(self, batch_size: int) -> dict[str, PhasedAcceptance]:
        """Each drafter's acceptance in the batch's phase. The in-hand check hands its own to
        the choice that follows it (:attr:`_checked`), so the two read one set of estimates
        and compute each rate once (nothing updates the estimators between them)."""
        phase = phase_of(batch_size)
        checked, self._checked = self._checked, None
        if checked is not None and checked[0] == phase:
            return checked[1]
        return {
            name: PhasedAcceptance(est, self._phase(name, phase))
            for name, est in self.estimators.items()
        }

    def _candidates(
        self,
        batch_size: int,
        phased: Mapping[str, PhasedAcceptance],
        in_hand: Mapping[str, Sequence[int]] | None = None,
        rooms: Sequence[int] | None = None,
    ) -> list[Candidate]:
        """``phased`` as candidates; for the drafters in ``in_hand``, this step's acceptance,
        from the lengths of their drafts in hand (one per row asked); for the others, with
        ``rooms`` (draft tokens each row of the batch can take), cut to the rows' room."""
        k, hand = self.selector.max_k, in_hand or {}
        room_limited = rooms is not None and self.room_aware and len(rooms) == batch_size
        out = []
        for name, acc in phased.items():
            if name in hand:
                out.append(Candidate(name, DraftsInHand.of(acc, hand[name], batch_size, k)))
            elif room_limited:
                out.append(Candidate(name, RoomLimited.of(acc, rooms or (), k)))
            else:
                out.append(Candidate(name, acc))
        return out

    def choose(self, batch_size: int) -> DraftChoice:
        """The choice on the estimates alone: no drafts in hand, no rooms."""
        return self.choose_with_drafts(batch_size, {})

    def drafters_in_hand(self, batch_size: int, model_free: Sequence[str]) -> list[str]:
        """The model-free drafters worth drafting for every row before this step's choice
        (``spec_decode.in_hand``): those that would be chosen if every row had a full draft.
        Where none could win (a drafter that matches poorly), no lookup is paid for."""
        if batch_size < 1 or not self.in_hand:
            return []
        phased = self._phased(batch_size)
        full = [self.selector.max_k] * batch_size
        worth = []
        for name in model_free:
            if name in phased:
                best = self._best(batch_size, self._candidates(batch_size, phased, {name: full}))
                if best.drafter == name:
                    worth.append(name)
        self._checked = (phase_of(batch_size), phased)
        return worth

    def choose_with_drafts(
        self,
        batch_size: int,
        lengths: Mapping[str, Sequence[int]],
        rooms: Sequence[int] | None = None,
    ) -> DraftChoice:
        """This step's choice with the drafts of ``lengths``' drafters in hand (their lengths,
        one per row asked): those drafters are scored on this step's exact fill, the others
        on the rows' ``rooms`` (one per row of the batch) where given. Hysteresis is for
        noisy estimates; a fill in hand is no estimate, so with drafts in hand the best
        choice is taken, and the selector carries it as its current one."""
        if batch_size < 1:
            return NO_DRAFT
        candidates = self._candidates(batch_size, self._phased(batch_size), lengths, rooms)
        if not lengths:
            if self.table is not None:
                self._seed_from_table(batch_size)
            return self.chose(self.selector.select(batch_size, candidates), candidates)
        best = self._best(batch_size, candidates)
        self.selector.adopt(best, batch_size)
        return self.chose(best, candidates)

    def best_at(self, batch_size: int) -> DraftChoice:
        """The best choice at ``batch_size`` on the current estimates, without hysteresis
        and without moving the selector (``native_schedule`` asks it for many batch sizes)."""
        if batch_size < 1:
            return NO_DRAFT
        best = self._best(batch_size, self._candidates(batch_size, self._phased(batch_size)))
        return best.strategy if best.enabled else NO_DRAFT

    def _best(self, batch_size: int, candidates: list[Candidate]) -> ScoredChoice:
        s = self.selector
        inp = SelectorInput(batch_size, tuple(candidates), s.max_k, s.cost_model, s.k_values)
        return choose_best(inp)

    def observe(self, feedback: StepFeedback) -> None:
        self._checked = None
        if not self.room_aware:  # every row as if it had room: its evidence too
            feedback = dataclasses.replace(feedback, trials_per_pos=())
        used = feedback.choice.drafter if feedback.choice.enabled else None
        idle = 0.5 ** (1.0 / (self.half_life_steps * IDLE_HALF_LIFE_FACTOR))
        for name, est in self.estimators.items():
            if name == used or name in feedback.shadow:
                rows = max(feedback.batch_size, feedback.num_drafts, 1)
                est.half_life_drafts = self.half_life_steps * rows  # one step = one half-life/h
            else:
                est.forget(idle)
        super().observe(feedback)
        if feedback.batch_size >= 1:
            phase = phase_of(feedback.batch_size)
            fold_feedback(feedback, {name: self._phase(name, phase) for name in self.estimators})

    def drafter_changed(self, name: str) -> None:
        """New weights: the pooled estimate restarts from its prior and the phases forget."""
        self._checked = None
        super().drafter_changed(name)
        for key in [key for key in self.phases if key[0] == name]:
            del self.phases[key]

    def _phase(self, drafter: str, phase: int) -> AcceptanceEstimator:
        """``drafter``'s evidence in batch ``phase`` (created empty)."""
        est = self.phases.get((drafter, phase))
        if est is None:
            est = AcceptanceEstimator(drafter, half_life_drafts=PHASE_HALF_LIFE_DRAFTS)
            self.phases[(drafter, phase)] = est
        return est

    def observe_step(self, step: StepRecord) -> None:
        """One engine step's record (the worker's step loop): refines the cost table."""
        if self.learner is not None:
            self.learner.observe_step(step)

    # -- coordinator hooks --------------------------------------------------------------------

    def apply_table(self, table: messages.StrategyTable, *, acceptance_drafts: float = 0.0) -> None:
        """Use the coordinator's table as the default choice of each batch bucket: entering a
        bucket (or receiving a new version) the selector starts from the table's entry and
        leaves it only when local estimates predict another strategy better by more than the
        hysteresis margin. ``acceptance_drafts`` > 0 also loads the table's pooled acceptance
        with that weight (see :meth:`set_pooled_acceptance`)."""
        self._checked = None
        self.table = table
        self._seeded = None
        if acceptance_drafts > 0 and table.acceptance:
            self.set_pooled_acceptance(
                {
                    d: estimator_from_rates(
                        d, r, drafts=acceptance_drafts, like=self.estimators.get(d)
                    )
                    for d, r in table.acceptance.items()
                }
            )

    def set_pooled_acceptance(self, pooled: Mapping[str, AcceptanceEstimator]) -> None:
        """Replace local evidence by the coordinator's pool (which already contains this
        worker's reported evidence); local updates continue on top of it. Drafters this
        worker does not run are ignored; settings (prior, half-life) stay local."""
        self._checked = None
        for name, est in pooled.items():
            mine = self.estimators.get(name)
            if mine is None:
                continue
            merged = mine.copy()
            merged.forget(0.0)
            self.estimators[name] = merged.merge(est)

    def _seed_from_table(self, batch_size: int) -> None:
        assert self.table is not None
        entry = next(
            (e for e in self.table.entries if e.min_batch <= batch_size <= e.max_batch), None
        )
        if entry is None:
            return
        mark = (self.table.table_version, entry.min_batch, entry.max_batch)
        if mark == self._seeded:
            return
        self._seeded = mark
        k = min(entry.k, self.selector.max_k)
        if entry.drafter == OFF or k == 0:
            seeded = evaluate(OFF, None, batch_size, 0, self.selector.cost_model)
        elif entry.drafter in self.estimators:
            est = self.estimators[entry.drafter]
            seeded = evaluate(entry.drafter, est, batch_size, k, self.selector.cost_model)
        else:
            return  # a drafter this worker does not run: decide locally
        self.selector.current = seeded
        self.selector.anchor_batch = batch_size


def _speculative(spec: GenerationSpec | SpeculativeSpec) -> SpeculativeSpec:
    return spec.speculative if isinstance(spec, GenerationSpec) else spec


def build_adaptive_strategy(
    engine: GenerationEngine,
    spec: GenerationSpec | SpeculativeSpec,
    cost_model: CostModel,
    *,
    k_values: Sequence[int] | None = None,
    priors: Mapping[str, BetaPrior] | None = None,
    learner: CostLearner | None = None,
) -> AdaptiveStrategy:
    """Selector + one estimator per drafter of the engine, tuned by ``spec.selector``; with a
    ``learner`` (over the same ``cost_model``) real steps refine the cost table."""
    return adaptive_strategy_for(
        list(engine.drafters), engine.max_k, spec, cost_model,
        k_values=k_values, priors=priors, learner=learner,
    )  # fmt: skip


def adaptive_strategy_for(
    drafters: Sequence[str],
    max_k: int,
    spec: GenerationSpec | SpeculativeSpec,
    cost_model: CostModel,
    *,
    k_values: Sequence[int] | None = None,
    priors: Mapping[str, BetaPrior] | None = None,
    learner: CostLearner | None = None,
) -> AdaptiveStrategy:
    """:func:`build_adaptive_strategy` for named drafters rather than an engine's (a native
    engine's one drafter: ``native_schedule``)."""
    speculative = _speculative(spec)
    tuning = speculative.selector
    table = {**PRIORS, **(priors or {})}
    estimators = {
        name: AcceptanceEstimator(name, table.get(name, BetaPrior())) for name in drafters
    }
    selector = AdaptiveSelector(cost_model, max_k, margin=tuning.hysteresis, k_values=k_values)
    strategy = AdaptiveStrategy(
        selector, estimators, half_life_steps=float(tuning.acceptance_half_life_steps)
    )
    if learner is not None:
        if learner.model is not cost_model:
            raise ValueError("the learner must refine the selector's own cost model")
        strategy.learner = learner
    return strategy


def expected_batch(spec: RLHFJobSpec, max_num_seqs: int) -> int:
    """The largest batch a generation worker of this job should expect: its share of an
    iteration's samples (prompts x samples / replicas), within its engine's slots. Calibrating
    larger batches would only cost start-up time (larger ones are extrapolated and learned
    online if reallocation ever moves that many samples to one worker)."""
    share = math.ceil(spec.algorithm.samples_per_iteration / spec.generation.replicas)
    return max(1, min(max_num_seqs, share))


def make_strategy(
    engine: GenerationEngine,
    spec: GenerationSpec | SpeculativeSpec,
    *,
    cache_dir: Path | None = None,
    log: Log | None = None,
    max_batch: int | None = None,
    budget_seconds: float | None = None,
) -> DraftStrategy:
    """The strategy a generation worker installs at start (``engine.set_strategy``) for its mode:
    plain decoding for off, the first drafter at numDraftTokens for fixed, and for adaptive
    the calibrated (or cached) cost table with :class:`AdaptiveStrategy`, learning online.

    ``max_batch``: the largest batch calibration measures (e.g. :func:`expected_batch`;
    default the engine's slots). ``budget_seconds``: calibration's time budget (default
    ``calibration_run.CALIBRATION_BUDGET_SECONDS``). With calibration on, the refined table is
    written back to the cache as the job runs; with it off, the table still learns but is
    not stored."""
    speculative = _speculative(spec)
    if speculative.mode is SpeculativeMode.OFF or not speculative.drafters:
        return FixedStrategy(NO_DRAFT)
    if speculative.mode is SpeculativeMode.FIXED:
        return FixedStrategy(DraftChoice(speculative.drafters[0].method.value, speculative.fixed_k))
    save: Callable[[CostModel], None] | None = None
    if speculative.selector.calibrate:
        cost_model = calibrated_cost_model(
            engine,
            cache_dir,
            log=log,
            max_batch=max_batch,
            budget_seconds=CALIBRATION_BUDGET_SECONDS if budget_seconds is None else budget_seconds,
        )
        path = cache_path(engine, cache_dir)
        save = lambda model: store_cost_model(model, path)  # noqa: E731
    else:
        cached = cached_cost_model(engine, cache_dir)
        cost_model = cached or uncalibrated_cost_model(engine.drafters, engine.max_k)
    learner = CostLearner(cost_model, save)
    return build_adaptive_strategy(engine, speculative, cost_model, learner=learner)
