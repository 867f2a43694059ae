"""Online learning of a draft model's drafting cost from the drafting time every step measures.

Place in the flow: the worker's cost learner (``generation.cost_learner``) passes each engine
step's measured drafting time to ``cost_model.CostModel.observe_draft``, which takes off the
proposer's own bookkeeping and hands the log ratio to its calibrated drafting cost here;
``CostModel.draft_seconds`` then answers the calibrated cost times ``exp(correction)``. Pure
standard library.

Why: calibration prices a draft model's call as k draft forwards, k x a per-token cost measured
at one k, with no fixed part. A real call also runs a catch-up forward over the tokens accepted
since the last draft, so it costs a + b*k with a > 0: on a 2-core Xeon with AMX (bf16, tiny
bench, 64 rows) calls added 6.5 / 10.3 / 16.4 / 25.9 ms to the proposer's own bookkeeping at
k = 1 / 2 / 4 / 8 where the table said 3.9 / 7.7 / 15.5 / 30.9: short drafts underpriced by up
to 1.7x, long ones overpriced. The selector trades k values at these prices, and before this
the verification cells absorbed what belonged to drafting. The drafting time is
measured on every step anyway, so the table learns it, per (drafter, k), as the verification
grid learns verification (``cost_online``). Replayed on three kept tiny-bench states it moved
ours by +0.3% on average (-1.3% to +4.0%): the selector's choices barely depend on it there.

Evidence: per (drafter, k), one cell per power-of-two batch size; an observation at B is
credited to the two cells around it with linear weights in log2 B, each cell keeps a decaying
weighted sum of log ratios (half-life ``DRAFT_HALF_LIFE`` observations' weight), and the
correction is that mean shrunk towards 0 (the calibrated cost) by ``DRAFT_PRIOR``
observations. A k never drafted keeps its calibrated price.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

StoredCell = tuple[str, int, int, float, float]
"""(drafter, k, log2 B cell, weight, weighted sum of log ratios): one cell, as saved."""

DRAFT_HALF_LIFE = 64.0
"""A cell's evidence halves every this many observations' weight credited to it."""
DRAFT_PRIOR = 4.0
"""Observations' worth of trust in the calibrated cost: the first few calls move it part way."""
DRAFT_CLIP = math.log(4.0)
"""One observation's log ratio is clipped to +-this (a call stalled by another process)."""
MAX_LOG2_BATCH = 12
"""Cells at B = 1, 2, 4, .., 4096; larger batches use the last cell."""


def _cells(batch: float) -> list[tuple[int, float]]:
    """The cells (log2 B index) an observation at ``batch`` is credited to, with weights."""
    x = min(max(math.log2(max(batch, 1.0)), 0.0), float(MAX_LOG2_BATCH))
    i = min(int(x), MAX_LOG2_BATCH - 1)
    f = x - i
    return [(i, 1.0 - f), (i + 1, f)]


class OnlineDraftCost:
    """Per (drafter, k), what measured drafting calls said about the calibrated cost."""

    def __init__(self, stored: Iterable[StoredCell] = ()) -> None:
        self._evidence: dict[tuple[str, int], dict[int, list[float]]] = {}
        """(drafter, k) -> log2 B cell -> [weight, weighted sum of log ratios]."""
        self.observations = 0
        for row in stored:
            self.absorb(*row)

    def observe(self, drafter: str, batch: int, k: int, log_ratio: float) -> None:
        """One drafting call of ``drafter`` at k for ``batch`` rows took exp(log_ratio) times
        its calibrated cost."""
        if batch < 1 or k < 1 or not math.isfinite(log_ratio):
            return
        ratio = max(-DRAFT_CLIP, min(DRAFT_CLIP, log_ratio))
        cells = self._evidence.setdefault((drafter, k), {})
        for cell, w in _cells(float(batch)):
            if w <= 0.0:
                continue
            entry = cells.setdefault(cell, [0.0, 0.0])
            keep = 0.5 ** (w / DRAFT_HALF_LIFE)
            entry[0] = entry[0] * keep + w
            entry[1] = entry[1] * keep + w * ratio
        self.observations += 1

    def correction(self, drafter: str, batch: int, k: int) -> float:
        """log(measured / calibrated) for a call at (B, k): 0 where nothing was observed."""
        cells = self._evidence.get((drafter, k))
        if not cells:
            return 0.0
        out = 0.0
        for cell, w in _cells(float(batch)):
            weight, total = cells.get(cell, (0.0, 0.0))
            out += w * total / (weight + DRAFT_PRIOR)
        return out

    # -- persistence (``CostModel.to_json``) ------------------------------------------------

    def stored(self) -> list[StoredCell]:
        """Every cell (:data:`StoredCell`)."""
        return [
            (drafter, k, cell, entry[0], entry[1])
            for (drafter, k), cells in sorted(self._evidence.items())
            for cell, entry in sorted(cells.items())
        ]

    def absorb(self, drafter: str, k: int, cell: int, weight: float, total: float) -> None:
        """Load one stored cell (see :meth:`stored`)."""
        entry = self._evidence.setdefault((drafter, k), {}).setdefault(cell, [0.0, 0.0])
        entry[0] += weight
        entry[1] += total
