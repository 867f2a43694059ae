"""How one iteration's rows are cut into optimizer steps and micro-batches.

Where it sits: inside ``trainer.policy_trainer``, between collating an iteration and the forward
passes, and in the inference worker's scoring passes (``inference.experience``): both roles cut
by length the same way, so the module sits below them. :func:`split_even` cuts the shuffled rows
into ``algorithm.mini_batches`` optimizer steps (the randomness RL needs stays there);
:func:`length_buckets` then cuts one rank's share of a step into micro-batches whose gradients
accumulate. The micro-batch cut is free to follow length because each micro-batch's loss is
weighted by its share of the step's tokens: the step's gradient is the same for any cut (up to
float rounding).

Why length buckets: every row of a micro-batch is padded to its longest row, and padding
costs as much compute as real tokens. Rollout lengths are long-tailed (the tiny job: mean
~22 tokens, max ~60), so fixed chunks of ``micro_batch_size`` rows padded ~2x the real tokens.
:func:`length_buckets` sorts by length and picks the contiguous cut that minimises padded
tokens plus a fixed cost per micro-batch, never exceeding ``micro_batch_size`` rows (the
memory bound the job set).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MICRO_BATCH_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 4096}
"""The fixed cost of one more micro-batch (forward + backward), in padded tokens it is worth.
cpu: measured on the tiny policy, one thread: ~35 ms per pass plus ~0.55 ms per token, so
~64 tokens. cuda: kernel launches dominate small passes; split only for large savings."""


def overhead_tokens(device: torch.device) -> int:
    """:data:`MICRO_BATCH_OVERHEAD_TOKENS` of ``device``'s type (cuda's for other types)."""
    return MICRO_BATCH_OVERHEAD_TOKENS.get(device.type, MICRO_BATCH_OVERHEAD_TOKENS["cuda"])


def split_even(items: Sequence[int], parts: int) -> list[list[int]]:
    """``parts`` contiguous slices whose sizes differ by at most one (none empty if possible)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (1 if k < extra else 0)
        out.append(list(items[start : start + size]))
        start += size
    return [part for part in out if part]


def length_buckets(
    rows: Sequence[int], lengths: Sequence[int], max_rows: int, overhead: int
) -> list[list[int]]:
    """Cut ``rows`` into micro-batches of similar length (shortest first).

    rows: row ids; lengths: the padded length each row needs (prompt + response), aligned
    with ``rows``; max_rows: at most this many rows per micro-batch; overhead: the cost of one
    micro-batch in padded tokens. Minimises ``sum(rows x longest row) + overhead x count``
    over contiguous cuts of the length-sorted rows (dynamic programming, O(n x max_rows)).
    Ties between equal lengths are broken by row id, so the cut is deterministic.
    """
    if len(rows) != len(lengths):
        raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    ordered = sorted(zip(lengths, rows, strict=True))
    n = len(ordered)
    best = [0] + [0] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = ordered[end - 1][0]
        best[end] = -1
        for start in range(max(0, end - max_rows), end):
            cost = best[start] + (end - start) * longest + overhead
            if best[end] < 0 or cost < best[end]:
                best[end], cut[end] = cost, start
    out: list[list[int]] = []
    end = n
    while end > 0:
        start = cut[end]
        out.append([row for _, row in ordered[start:end]])
        end = start
    return out[::-1]
