"""Which (B, T) cells a start-up calibration measures, and in which order.

Place in the flow: a generation worker asks `calibration_plan` for the grid to time once per
(model, hardware) (batch sizes from `calibration_batches`, T = k + 1 tokens verified per
sequence) and measures it in `calibration_order` within a time budget; the measurements become
a `cost_model.CostModel`, whose fill (`cost_surface`) covers the cells the budget did not
reach. Pure standard library.
"""

from __future__ import annotations

from collections.abc import Iterable


def calibration_batches(max_batch: int, *, max_points: int = 5) -> list[int]:
    """Batch sizes to measure: 1, then x4 steps, always ending at max_batch.

    Step time is close to piecewise-affine in B with one memory/compute knee; geometric
    spacing places points on both sides of the knee wherever it falls, in few steps.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    out = [1]
    while out[-1] * 4 < max_batch:
        out.append(out[-1] * 4)
    if out[-1] != max_batch:
        out.append(max_batch)
    while len(out) > max(max_points, 2):
        # Drop the interior point whose neighbours are closest (in ratio): least lost.
        i = min(range(1, len(out) - 1), key=lambda j: out[j + 1] / out[j - 1])
        del out[i]
    return out


def calibration_plan(max_batch: int, max_k: int, *, max_points: int = 20) -> list[tuple[int, int]]:
    """The (B, T) grid a worker should time once per model + hardware (~10-20 points).

    T = 1 (plain decode) and T = 2 anchor the cheap end; then T = k + 1 for k in powers of two
    up to max_k, always including max_k + 1 so nothing the selector may choose is
    extrapolated. Order is by B then T; callers should interleave repeats: on a shared machine
    another process can double a single timing (docs/cpu-notes.md §5).
    """
    if max_k < 0:
        raise ValueError("max_k must be >= 0")
    ts = {1, max_k + 1}
    k = 1
    while k <= max_k:
        ts.add(k + 1)
        k *= 2
    t_list = sorted(ts)
    bs = calibration_batches(max_batch)
    while len(bs) * len(t_list) > max_points and len(t_list) > 2:
        del t_list[len(t_list) // 2]  # thin T first: cost is close to linear in T
    if len(bs) * len(t_list) > max_points:
        bs = calibration_batches(max_batch, max_points=max(2, max_points // len(t_list)))
    return [(b, t) for b in bs for t in t_list]


def _bisection_ranks(n: int) -> list[int]:
    """Rank of each index of a sorted axis of n values: both ends 0, the middle 1, the
    quarter points 2, ...: the order in which points add most to an interpolation."""
    ranks = [0] * n
    todo = [(0, n - 1, 1)]
    while todo:
        lo, hi, rank = todo.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        ranks[mid] = rank
        todo += [(lo, mid, rank + 1), (mid, hi, rank + 1)]
    return ranks


def calibration_order(plan: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The plan's cells in the order a time-bounded calibration should measure them.

    First the four corners (B = 1 and the largest B, at T = 1 and the largest T): with them
    the fill `Surface` is determined everywhere. Then cells by bisection of the B and T axes
    (a middle B before a quarter B), new batch sizes before new T values (cost is close to
    linear in T, so T is the cheaper axis to interpolate), and within a rank the cheaper
    cell (smaller B x T) first, so that more cells fit in what is left of the budget.
    """
    cells = sorted(set(plan))
    bs = sorted({b for b, _ in cells})
    ts = sorted({t for _, t in cells})
    rank_b = dict(zip(bs, _bisection_ranks(len(bs)), strict=True))
    rank_t = dict(zip(ts, _bisection_ranks(len(ts)), strict=True))
    return sorted(
        cells,
        key=lambda c: (max(rank_b[c[0]], rank_t[c[1]]), rank_t[c[1]], rank_b[c[0]], c[0] * c[1]),
    )
