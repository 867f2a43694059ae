"""The drafting strategy of one step, (drafter, k), and a batch-size range that uses one.

Place in the flow: every layer that names a strategy speaks this one type. The selector
(`selector.AdaptiveSelector`, `selector.selector_table`) scores `DraftChoice`s, the bandit
baseline explores them, the generation worker's drafting strategies
(``generation.draft_strategy``) return one per decode step and the proposer drafts with it. A
`BatchRange` is a (lo, hi) batch-size range with its choice: a row of the coordinator's
strategy table and of a per-batch-size schedule. Both are NamedTuples, so they compare equal
to the plain ``(drafter, k)`` / ``(lo, hi, drafter, k)`` tuples the bandit and the benchmarks
use as keys. Pure standard library.
"""

from __future__ import annotations

from typing import NamedTuple

from .cost_records import OFF


class DraftChoice(NamedTuple):
    """Which drafter, and how many tokens it proposes per request; (OFF, 0): no drafting."""

    drafter: str
    k: int

    @property
    def enabled(self) -> bool:
        return self.drafter != OFF and self.k > 0


NO_DRAFT = DraftChoice(OFF, 0)


class BatchRange(NamedTuple):
    """Batch sizes lo..hi (inclusive) use (drafter, k)."""

    lo: int
    hi: int
    drafter: str
    k: int

    @property
    def choice(self) -> DraftChoice:
        return DraftChoice(self.drafter, self.k)

    def covers(self, batch_size: int) -> bool:
        return self.lo <= batch_size <= self.hi
