"""Online cost learning: real engine steps refine the selector's cost table, which goes back
to the calibration cache now and then.

Where it sits: ``adaptive.build_adaptive_strategy`` gives the adaptive strategy a
:class:`CostLearner` over its own cost model; the worker passes every engine step's record to
``AdaptiveStrategy.observe_step``, which hands it here. The cache writer is
``cost_cache.store_cost_model``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from rlhfspec_workers.spec_decode.cost_model import CostModel

from .records import StepRecord

logger = logging.getLogger(__name__)

SAVE_EVERY_SECONDS = 60.0
"""The online-refined cost table goes back to the cache at most this often..."""
SAVE_MIN_STEPS = 64
"""...and only after this many new steps were learned from."""


class CostLearner:
    """Real engine steps -> the cost table (``CostModel.observe_verify``), saved now and then.

    A step's record says how many rows it verified (B), how many draft tokens they verified
    in all, how long the whole step took and what drafting the next step cost. The table's
    verification cost excludes a drafter's own work, so the observation is the step minus the
    table's drafting cost of the strategy drafted in it (``next_drafter``/``next_k``): the
    sum is what the selector predicts for such a step. The step's measured drafting time
    (``draft_seconds``) first teaches the table that drafting cost
    (``CostModel.observe_draft``: a draft model's calls cost more than calibration's k
    forwards at short k, less at long k). Rows without a draft verify one token,
    so T is 1 + draft tokens / B, fractional. Steps that also prefilled newly admitted prompts
    look slower than decode steps; the table clips each observation's pull (see
    ``spec_decode.cost_online.ONLINE_CLIP``) and such steps are few once the batch drains.

    ``save`` (the cache writer) is called from :meth:`observe_step` at most every
    ``save_every_seconds`` and after ``min_steps`` new steps, and by :meth:`save_now`; a
    failing write is logged and retried later, never raised into the engine loop.
    """

    def __init__(
        self,
        model: CostModel,
        save: Callable[[CostModel], None] | None = None,
        *,
        save_every_seconds: float = SAVE_EVERY_SECONDS,
        min_steps: int = SAVE_MIN_STEPS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self._save = save
        self.save_every_seconds = save_every_seconds
        self.min_steps = min_steps
        self._clock = clock
        self._last_save = clock()
        self.steps = 0
        """Steps learned from."""
        self._unsaved = 0
        self.saves = 0

    def observe_step(self, step: StepRecord) -> None:
        if step.batch_size < 1 or not math.isfinite(step.step_seconds):
            return
        if step.prefill_tokens > 0:
            return  # also computed prompts: no verification cost at (B, T) alone
        seconds = step.step_seconds
        if step.next_k > 0 and step.next_drafter in self.model.drafters:
            if step.draft_seconds > 0.0:
                self.model.observe_draft(
                    step.next_drafter, step.batch_size, step.next_k, step.draft_seconds
                )
            seconds -= self.model.draft_seconds(step.next_drafter, step.batch_size, step.next_k)
        if seconds <= 0.0:
            return
        tokens = 1.0 + max(step.num_draft_tokens, 0) / step.batch_size
        self.model.observe_verify(step.batch_size, tokens, seconds)
        self.steps += 1
        self._unsaved += 1
        if (
            self._save is not None
            and self._unsaved >= self.min_steps
            and self._clock() - self._last_save >= self.save_every_seconds
        ):
            self.save_now()

    def save_now(self) -> None:
        """Write the refined table (if anything was learned since the last write)."""
        if self._save is None or self._unsaved == 0:
            return
        self._last_save = self._clock()
        self.model.refresh()
        try:
            self._save(self.model)
        except OSError as err:
            logger.warning("could not store the refined cost table: %s", err)
            return
        self._unsaved = 0
        self.saves += 1
