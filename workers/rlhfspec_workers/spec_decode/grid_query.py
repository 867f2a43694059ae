"""The verification-cost grid as the selector reads it, many times a step.

Place in the flow: ``cost_model.CostModel`` keeps one `GridQuery` over its current grid (the
calibrated surface corrected by online evidence) and builds a new one whenever that grid is
rebuilt, so nothing kept here outlives the grid it was computed from. The selector asks
verify(B, T) a few dozen times a step: for whole k (``at_k``, the same cells every step) and
for fractional T (``at_tokens``: rows with short or no drafts verify fewer tokens, and a
drafter's expected fill changes every step). Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from .cost_surface import grid_value, interpolate

CACHE_LIMIT = 65536
"""Cells kept per grid; past it, queries are computed and not kept (memory stays bounded
however many batch sizes a long run goes through)."""


class GridQuery:
    """verify(B, T) over one grid (rows per B in ``bs``, columns per T in ``ts``), with what
    the selector asks repeatedly kept."""

    def __init__(
        self, bs: Sequence[float], ts: Sequence[float], grid: Sequence[Sequence[float]]
    ) -> None:
        self.bs, self.ts, self.grid = tuple(bs), tuple(ts), grid
        self._cells: dict[tuple[int, int], float] = {}
        self._columns: dict[int, tuple[float, ...]] = {}
        self.separable = all(
            below <= above
            for lower, upper in pairwise(grid)
            for below, above in zip(lower, upper, strict=True)
        )
        """Whether every column is non-decreasing in B: then, inside the grid's T range,
        ``grid_value``'s running max over B changes nothing and the surface is plain bilinear
        interpolation, which can be done along B first (:meth:`_column`)."""

    def at_k(self, batch: int, k: int) -> float:
        """verify(batch, k + 1): k draft tokens per sequence."""
        cached = self._cells.get((batch, k))
        if cached is None:
            cached = grid_value(self.bs, self.ts, self.grid, float(batch), float(k + 1))
            if len(self._cells) < CACHE_LIMIT:
                self._cells[(batch, k)] = cached
        return cached

    def at_tokens(self, batch: int, tokens_per_seq: float) -> float:
        """verify(batch, T) at a fractional T: one 1-D interpolation on the batch's column
        instead of one per grid row; past the grid's T (rows extrapolated with different
        slopes can cross there) the whole surface is read."""
        if self.separable and (tokens_per_seq <= self.ts[-1] or len(self.ts) == 1):
            return interpolate(self.ts, self._column(batch), tokens_per_seq)
        return grid_value(self.bs, self.ts, self.grid, float(batch), tokens_per_seq)

    def _column(self, batch: int) -> tuple[float, ...]:
        """The surface at ``batch`` on each T knot."""
        column = self._columns.get(batch)
        if column is None:
            b = float(batch)
            column = tuple(
                interpolate(self.bs, [row[j] for row in self.grid], b) for j in range(len(self.ts))
            )
            if len(self._columns) < CACHE_LIMIT:
                self._columns[batch] = column
        return column
