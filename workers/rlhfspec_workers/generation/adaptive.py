"""Adaptive speculative decoding, wired for real: cost table, per-step policy, coordinator hooks.

Where it sits: a generation worker builds its ``GenerationEngine`` and then, once, calls
:func:`make_policy` and installs the result (``engine.set_policy``). In adaptive mode that

1. loads the cost table of (policy model, hardware) from the calibration cache, or measures it
   on the running engine (``calibrate.py``: the verification grid of
   ``spec_decode.calibration_plan`` and each drafter's cost) and stores it
   (:func:`calibrated_cost_model`);
2. builds :class:`AdaptivePolicy` (:func:`build_adaptive_policy`): one
   ``AcceptanceEstimator`` per drafter, with priors and the spec's half-life in decode steps,
   and an ``AdaptiveSelector`` with the spec's hysteresis.

Every decode step the proposer asks the policy for (drafter, k) and feeds back how the previous
step's drafts fared. While the job runs, the worker passes the coordinator's broadcasts in:
:meth:`AdaptivePolicy.apply_table` (a ``messages.StrategyTable``: the pooled choice per batch
bucket, used as the default that local evidence may override) and
:meth:`AdaptivePolicy.set_pooled_acceptance` (acceptance pooled over all workers).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rlhfspec_api.generation import GenerationSpec, SpeculativeMode, SpeculativeSpec
from rlhfspec_workers import messages
from rlhfspec_workers.spec_decode.acceptance import AcceptanceEstimator, BetaPrior
from rlhfspec_workers.spec_decode.cost_model import CostModel, CostTableKey
from rlhfspec_workers.spec_decode.selector import AdaptiveSelector, Candidate, evaluate

from .cost_table import (
    Log,
    cached_cost_model,
    calibrated_cost_model,
    cost_table_key,
    default_cache_dir,
    uncalibrated_cost_model,
)
from .policy import (
    NO_DRAFT,
    OFF,
    BatchSizePolicy,
    DraftChoice,
    DraftPolicy,
    FixedPolicy,
    SelectorPolicy,
    StepFeedback,
)

if TYPE_CHECKING:  # the engine imports vLLM: policies and their tests must not need it
    from .engine import GenerationEngine

__all__ = [
    "AdaptivePolicy",
    "CostTableKey",
    "build_adaptive_policy",
    "calibrated_cost_model",
    "cost_table_key",
    "default_cache_dir",
    "estimator_from_rates",
    "make_policy",
    "table_policy",
]

logger = logging.getLogger(__name__)

PRIORS: dict[str, BetaPrior] = {
    # A trained draft model usually agrees with its target most of the time.
    "draft_model": BetaPrior(mean=0.6, strength=4.0, position_decay=0.95),
    # Model-free drafters: coverage (rows with no match count as rejected) keeps them lower.
    "suffix": BetaPrior(mean=0.4, strength=4.0, position_decay=0.95),
    "ngram": BetaPrior(mean=0.25, strength=4.0, position_decay=0.9),
}
IDLE_HALF_LIFE_FACTOR = 4.0
"""A drafter not in use forgets its evidence this many times slower than one in use: its
estimate drifts back to the prior, so a drafter that looked bad is eventually retried."""


# -- the policy ---------------------------------------------------------------------------------


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


class AdaptivePolicy(SelectorPolicy):
    """The selector policy of adaptive mode (see module docstring).

    Acceptance ages per decode step, as the spec says: the estimator of the drafter used in a
    step decays by 0.5 ** (1 / half_life_steps) whatever the batch size; estimators of drafters
    not in use decay ``IDLE_HALF_LIFE_FACTOR`` times slower, back towards their priors.
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
        self.table: messages.StrategyTable | None = None
        self._seeded: tuple[int, int, int] | None = None
        """(table version, bucket lo, bucket hi) whose entry the selector was last seeded with."""

    # -- per step ---------------------------------------------------------------------------

    def choose(self, batch_size: int) -> DraftChoice:
        if batch_size < 1:
            return NO_DRAFT
        candidates = [Candidate(name, est) for name, est in self.estimators.items()]
        if self.table is not None:
            self._seed_from_table(batch_size)
        choice = self.selector.select(batch_size, candidates)
        return DraftChoice(choice.drafter, choice.k) if choice.enabled else NO_DRAFT

    def observe(self, feedback: StepFeedback) -> None:
        used = feedback.choice.drafter if feedback.choice.enabled else None
        idle = 0.5 ** (1.0 / (self.half_life_steps * IDLE_HALF_LIFE_FACTOR))
        for name, est in self.estimators.items():
            if name == used:
                rows = max(feedback.batch_size, feedback.num_drafts, 1)
                est.half_life_drafts = self.half_life_steps * rows  # one step = one half-life/h
            else:
                est.forget(idle)
        super().observe(feedback)

    # -- coordinator hooks --------------------------------------------------------------------

    def apply_table(self, table: messages.StrategyTable, *, acceptance_drafts: float = 0.0) -> None:
        """Use the coordinator's table as the default choice of each batch bucket: entering a
        bucket (or receiving a new version) the selector starts from the table's entry and
        leaves it only when local estimates predict another strategy better by more than the
        hysteresis margin. ``acceptance_drafts`` > 0 also loads the table's pooled acceptance
        with that weight (see :meth:`set_pooled_acceptance`)."""
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


def table_policy(table: messages.StrategyTable) -> BatchSizePolicy:
    """Follow a coordinator table exactly (no local decision), e.g. for comparisons."""
    return BatchSizePolicy([(e.min_batch, e.max_batch, e.drafter, e.k) for e in table.entries])


def _speculative(spec: GenerationSpec | SpeculativeSpec) -> SpeculativeSpec:
    return spec.speculative if isinstance(spec, GenerationSpec) else spec


def build_adaptive_policy(
    engine: GenerationEngine,
    spec: GenerationSpec | SpeculativeSpec,
    cost_model: CostModel,
    *,
    k_values: Sequence[int] | None = None,
    priors: Mapping[str, BetaPrior] | None = None,
) -> AdaptivePolicy:
    """Selector + one estimator per drafter of the engine, tuned by ``spec.selector``."""
    speculative = _speculative(spec)
    tuning = speculative.selector
    table = {**PRIORS, **(priors or {})}
    estimators = {
        name: AcceptanceEstimator(name, table.get(name, BetaPrior())) for name in engine.drafters
    }
    selector = AdaptiveSelector(
        cost_model, engine.max_k, margin=tuning.hysteresis, k_values=k_values
    )
    return AdaptivePolicy(
        selector, estimators, half_life_steps=float(tuning.acceptance_half_life_steps)
    )


def make_policy(
    engine: GenerationEngine,
    spec: GenerationSpec | SpeculativeSpec,
    *,
    cache_dir: Path | None = None,
    log: Log | None = None,
) -> DraftPolicy:
    """The policy a generation worker installs at start (``engine.set_policy``) for its mode:
    plain decoding for off, the first drafter at numDraftTokens for fixed, and for adaptive
    the calibrated (or cached) cost table with :class:`AdaptivePolicy`."""
    speculative = _speculative(spec)
    if speculative.mode is SpeculativeMode.OFF or not speculative.drafters:
        return FixedPolicy(NO_DRAFT)
    if speculative.mode is SpeculativeMode.FIXED:
        return FixedPolicy(DraftChoice(speculative.drafters[0].method.value, speculative.fixed_k))
    if speculative.selector.calibrate:
        cost_model = calibrated_cost_model(engine, cache_dir, log=log)
    else:
        cached = cached_cost_model(engine, cache_dir)
        cost_model = cached or uncalibrated_cost_model(engine.drafters, engine.max_k)
    return build_adaptive_policy(engine, speculative, cost_model)
