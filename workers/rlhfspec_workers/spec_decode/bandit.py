"""TLT-style baseline selector: bucketed epsilon-greedy bandit over drafting strategies.

Place in the flow: a drop-in alternative to `AdaptiveSelector` for the benchmark. Where the
model-based selector predicts throughput from a calibrated cost model and acceptance
estimates, this one learns it by trial, as TLT / FastRL does: per batch-size bucket it
keeps a sliding window (300) of observed rewards, reward = accept_length x batch_size /
step_time (emitted tokens per second), exploits the best windowed mean, and explores a random
strategy with probability epsilon (0.1). TLT's guards are kept as options: speculate only
while B <= 32 and only while draft tokens x B <= 2048. Same strategy set and the same `ScoredChoice`
output as the selector, so the two can be swapped in one benchmark loop.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .cost_records import OFF
from .selector import ScoredChoice

Strategy = tuple[str, int]


def strategy_set(drafters: Iterable[str], k_values: Iterable[int]) -> list[Strategy]:
    """("off", 0) plus every (drafter, k) with k >= 1: the arms shared with the selector."""
    ks = sorted({k for k in k_values if k >= 1})
    return [(OFF, 0)] + [(d, k) for d in drafters for k in ks]


def bucket_of(batch_size: int) -> int:
    """Power-of-two bucket: the smallest 2^i >= batch_size (same ranges as `batch_buckets`)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    return 1 << (batch_size - 1).bit_length()


@dataclass
class _Window:
    """Last `size` (arm, reward) pairs of one bucket, with running per-arm sums."""

    size: int
    items: deque[tuple[Strategy, float]] = field(default_factory=deque)
    sums: dict[Strategy, float] = field(default_factory=dict)
    counts: dict[Strategy, int] = field(default_factory=dict)

    def add(self, arm: Strategy, reward: float) -> None:
        self.items.append((arm, reward))
        self.sums[arm] = self.sums.get(arm, 0.0) + reward
        self.counts[arm] = self.counts.get(arm, 0) + 1
        if len(self.items) > self.size:
            old, r = self.items.popleft()
            self.sums[old] -= r
            self.counts[old] -= 1

    def mean(self, arm: Strategy) -> float:
        n = self.counts.get(arm, 0)
        return self.sums[arm] / n if n else math.nan


class BanditSelector:
    """Epsilon-greedy per batch-size bucket, seeded (`random.Random(seed)`) for reproducibility.

    Call `select(B)` before a step and `observe(B, strategy, accept_length, step_seconds)`
    after it. Arms never tried within the current window are tried first, so every arm gets a
    reading before exploitation starts (and again after it has aged out of the window).
    """

    def __init__(
        self,
        strategies: Sequence[Strategy],
        *,
        epsilon: float = 0.1,
        window: int = 300,
        seed: int = 0,
        max_spec_batch: int | None = 32,
        max_batch_draft_tokens: int | None = 2048,
    ) -> None:
        if not 0.0 <= epsilon <= 1.0 or window < 1:
            raise ValueError("need 0 <= epsilon <= 1 and window >= 1")
        arms = list(dict.fromkeys((d, 0) if d == OFF else (d, k) for d, k in strategies))
        if (OFF, 0) not in arms:
            arms.insert(0, (OFF, 0))  # always a fallback, and the speedup reference
        self.arms: tuple[Strategy, ...] = tuple(arms)
        self.epsilon = epsilon
        self.window = window
        self.max_spec_batch = max_spec_batch
        self.max_batch_draft_tokens = max_batch_draft_tokens
        self._rng = random.Random(seed)
        self._windows: dict[int, _Window] = {}

    def allowed(self, batch_size: int) -> list[Strategy]:
        """Arms TLT's guards permit at this batch size (off is always permitted)."""
        out = []
        for d, k in self.arms:
            if k > 0:
                if self.max_spec_batch is not None and batch_size > self.max_spec_batch:
                    continue
                if (
                    self.max_batch_draft_tokens is not None
                    and k * batch_size > self.max_batch_draft_tokens
                ):
                    continue
            out.append((d, k))
        return out

    def _window(self, batch_size: int) -> _Window:
        b = bucket_of(batch_size)
        if b not in self._windows:
            self._windows[b] = _Window(self.window)
        return self._windows[b]

    def select(self, batch_size: int) -> ScoredChoice:
        arms = self.allowed(batch_size)
        win = self._window(batch_size)
        untried = [a for a in arms if win.counts.get(a, 0) == 0]
        if untried:
            arm = self._rng.choice(untried)
        elif len(arms) > 1 and self._rng.random() < self.epsilon:
            arm = self._rng.choice(arms)
        else:
            # max() keeps the first of equals: arms are ordered off first, then by k
            arm = max(arms, key=win.mean)
        return self._choice(arm, win)

    def observe(
        self,
        batch_size: int,
        strategy: Strategy | ScoredChoice,
        accept_length: float,
        step_seconds: float,
    ) -> float:
        """Record one step's outcome; returns the reward. accept_length: tokens emitted per
        sequence in the step (accepted drafts + 1; exactly 1 for off)."""
        arm = strategy.strategy if isinstance(strategy, ScoredChoice) else strategy
        if arm[0] == OFF:
            arm = (OFF, 0)
        if step_seconds <= 0:
            raise ValueError("step_seconds must be > 0")
        reward = accept_length * batch_size / step_seconds
        self._window(batch_size).add(arm, reward)
        return reward

    def means(self, batch_size: int) -> dict[Strategy, float]:
        """Windowed mean reward per arm in batch_size's bucket (NaN: no reading)."""
        win = self._window(batch_size)
        return {a: win.mean(a) for a in self.arms}

    def counts(self, batch_size: int) -> dict[Strategy, int]:
        win = self._window(batch_size)
        return {a: win.counts.get(a, 0) for a in self.arms}

    def _choice(self, arm: Strategy, win: _Window) -> ScoredChoice:
        tps = win.mean(arm)
        base = win.mean((OFF, 0))
        speedup = tps / base if base > 0 and not math.isnan(tps) else math.nan
        return ScoredChoice(arm[0], arm[1], tps, speedup)
