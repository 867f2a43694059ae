"""What a generation worker counts: per-iteration figures and the tokens it decoded.

Where it sits: owned by the generation worker (``worker.GenerationWorker``) and written by
everything that moves a sample: the loop (engine steps, finished samples, weight syncs), the
hand-over (migrations, reclaimed tasks, KV snapshots sent) and the KV pulls (snapshots
received, fallbacks). Each heartbeat drains the per-iteration figures into the iteration's
gen-stats hash in Redis and reports the token totals in the worker's status. The iteration's
``tokens`` and ``samples`` figures are not among them: they are added with the transaction that
publishes a sample (``worker._finish``), so a sample counts once however often it was decoded.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rlhfspec_workers.messages import SampleTask

RATE_WINDOW_SECONDS = 5.0


@dataclass
class GenerationCounters:
    by_iteration: dict[int, dict[str, float]] = field(default_factory=dict)
    """Iteration -> counter -> amount since the last heartbeat flushed them."""
    tokens_total: int = 0
    """Tokens this worker decoded for training iterations, since it started."""
    # (finish time, tokens) of recently finished samples, trimmed by age, not count: a count
    # cap undercounts the rate whenever many short samples finish together.
    _recent: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, iteration: int, name: str, amount: float) -> None:
        bucket = self.by_iteration.setdefault(iteration, {})
        bucket[name] = bucket.get(name, 0.0) + amount

    def drain(self) -> dict[int, dict[str, float]]:
        out, self.by_iteration = self.by_iteration, {}
        return out

    def count_generated(self, task: SampleTask, produced: int) -> None:
        """Tokens this worker decoded for ``task``, counted when the sample finishes here or
        is handed over (the prefix it carries away), by the worker that decoded them, so
        its rate and the per-worker trace (``tokens_total``, in the heartbeat) include
        migrated samples' work on both sides. This is work done, not samples made: a sample
        decoded again after a kill counts again here. The iteration's ``tokens`` figure is
        not counted here but when the sample is published (``worker._finish``), once per
        sample; without kills or copies the two agree. Held-out samples stay out of
        ``tokens_total`` and the trace."""
        self._recent.append((time.monotonic(), produced))
        if task.eval:
            return
        self.tokens_total += produced

    def tokens_per_second(self, now: float) -> float:
        """Decoded tokens per second over the last few seconds (``now``: monotonic)."""
        while self._recent and now - self._recent[0][0] >= RATE_WINDOW_SECONDS:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / RATE_WINDOW_SECONDS
