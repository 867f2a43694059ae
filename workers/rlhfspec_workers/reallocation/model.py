"""What the reallocation planner reasons about: load reports, worker speed, migration cost.

Where it sits: the coordinator turns each generation worker's load report (running samples,
tokens generated so far) into `WorkerLoad`s, the calibrated `CostModel` plus the strategy the
selector picks at each batch size into a `ThroughputModel`, and its migration settings into a
`MigrationCost`; `planner.plan_migrations` consumes all three and returns `Migration`s, which
the coordinator sends as `MigrationOrder`s. The simulator replays the same objects.

The speed model is "fluid": a worker running B samples advances every one of them by
`tokens_per_step(B)` tokens every `step_seconds(B)` seconds (speculation included: the selector's
k at that B and its expected emitted tokens); `profile` drains a worker on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..spec_decode.acceptance import FixedAcceptance
from ..spec_decode.cost_model import CostModel
from ..spec_decode.cost_records import OFF
from ..spec_decode.selector import Candidate, SelectorInput, choose

MigrationMode = Literal["recompute", "kv_transfer"]
ModePolicy = Literal["auto", "recompute", "kv_transfer"]

_PREFILL_PROBE = (32, 15)
"""Prefill is compute-bound and multi-token: its per-token cost is read off the cost model at
B = 32 sequences x T = 16 tokens (512 tokens in one step, the per-step floor amortised), the
most prefill-like cell a verification grid has (extrapolated when the grid stops short)."""


@dataclass(frozen=True)
class RunningSample:
    """One sample a worker holds, as its load report states it."""

    sample_id: str
    generated_tokens: int
    predicted_remaining: float | None = None
    """None: the planner asks its length predictor."""
    prompt_tokens: int = 0
    group_id: str | None = None
    running: bool = True
    """False: admitted to the worker but waiting for a free slot (no KV state yet)."""
    last_migrated_at: float | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.generated_tokens < 0 or self.prompt_tokens < 0:
            raise ValueError(f"token counts must be >= 0: {self}")

    @property
    def context_tokens(self) -> int:
        """What a destination must rebuild: nothing for a sample that never started."""
        return self.prompt_tokens + self.generated_tokens if self.running else 0


@dataclass(frozen=True)
class WorkerLoad:
    """One generation worker's load report."""

    name: str
    samples: tuple[RunningSample, ...]
    free_slots: int

    def __post_init__(self) -> None:
        if self.free_slots < 0:
            raise ValueError(f"free_slots must be >= 0 on {self.name}")

    @property
    def running(self) -> int:
        return sum(1 for s in self.samples if s.running)

    @property
    def capacity(self) -> int:
        return self.running + self.free_slots


@dataclass(frozen=True)
class ThroughputModel:
    """Per worker: seconds per engine step and tokens emitted per sequence per step, by B.

    Index B - 1 holds batch size B. Past the table, step time continues the last slope
    (compute-bound) and tokens per step stay at the last value.
    """

    step_seconds: tuple[float, ...]
    tokens_per_step: tuple[float, ...]
    prefill_seconds_per_token: float
    strategies: tuple[tuple[str, int], ...] = ()
    """(drafter, k) chosen at each B, for reports."""

    def __post_init__(self) -> None:
        if not self.step_seconds or len(self.step_seconds) != len(self.tokens_per_step):
            raise ValueError("step_seconds and tokens_per_step must be non-empty, equal length")
        if any(not (s > 0.0 and math.isfinite(s)) for s in self.step_seconds):
            raise ValueError("step times must be finite and > 0")
        if any(not t >= 1.0 for t in self.tokens_per_step):
            raise ValueError("a step emits at least one token per sequence")
        if self.prefill_seconds_per_token < 0.0:
            raise ValueError("prefill_seconds_per_token must be >= 0")

    @property
    def max_batch(self) -> int:
        return len(self.step_seconds)

    def step(self, batch: int) -> float:
        if batch < 1:
            raise ValueError("batch must be >= 1")
        if batch <= self.max_batch:
            return self.step_seconds[batch - 1]
        if self.max_batch == 1:
            return self.step_seconds[0] * batch  # no slope known: assume compute-bound
        slope = max(self.step_seconds[-1] - self.step_seconds[-2], 0.0)
        return self.step_seconds[-1] + slope * (batch - self.max_batch)

    def tokens(self, batch: int) -> float:
        return self.tokens_per_step[min(max(batch, 1), self.max_batch) - 1]

    def seconds_per_token(self, batch: int) -> float:
        """Time for each of B running sequences to gain one token."""
        return self.step(batch) / self.tokens(batch)

    def prefill_seconds(self, tokens: int) -> float:
        return tokens * self.prefill_seconds_per_token

    @classmethod
    def from_cost_model(
        cls,
        cost: CostModel,
        *,
        max_batch: int,
        candidates: Sequence[Candidate] = (),
        max_k: int = 0,
        k_values: Sequence[int] | None = None,
        prefill_seconds_per_token: float | None = None,
    ) -> ThroughputModel:
        """Speed at each B = the selector's best (drafter, k) there: its step time and its
        expected emitted tokens (accepted + bonus). No candidates: plain decoding."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        steps, tokens, strategies = [], [], []
        ks = None if k_values is None else tuple(k_values)
        for b in range(1, max_batch + 1):
            c = choose(SelectorInput(b, tuple(candidates), max_k, cost, ks))
            step = cost.step_seconds(c.drafter, b, c.k)
            steps.append(step)
            tokens.append(max(1.0, c.tokens_per_second * step / b))
            strategies.append((c.drafter, c.k))
        if prefill_seconds_per_token is None:
            b, k = _PREFILL_PROBE
            prefill_seconds_per_token = cost.verify_seconds(b, k) / (b * (k + 1))
        return cls(tuple(steps), tuple(tokens), prefill_seconds_per_token, tuple(strategies))

    @classmethod
    def from_table(
        cls,
        rows: Iterable[tuple[int, float, float]],
        *,
        prefill_seconds_per_token: float | None,
        max_batch: int | None = None,
    ) -> ThroughputModel:
        """From a measured table of (batch size, seconds per step, tokens per sequence per step),
        e.g. a real run's batch trace; linear between measured batch sizes, clamped below.
        ``prefill_seconds_per_token`` None (no prefill timed yet): a compute-bound prompt token
        costs about what a decode row costs at the largest batch, the cheapest per-row step
        time in the table."""
        by_b: dict[int, tuple[float, float]] = {}
        for b, s, t in rows:
            by_b[int(b)] = (float(s), float(t))
        if not by_b:
            raise ValueError("need at least one measured row")
        if prefill_seconds_per_token is None:
            prefill_seconds_per_token = min(s / b for b, (s, _) in by_b.items())
        bs = sorted(by_b)
        top = max_batch or bs[-1]
        steps, tokens = [], []
        for b in range(1, top + 1):
            steps.append(_interp(bs, [by_b[x][0] for x in bs], b))
            tokens.append(max(1.0, _interp(bs, [by_b[x][1] for x in bs], b)))
        return cls(tuple(steps), tuple(tokens), prefill_seconds_per_token)

    @classmethod
    def plain(cls, cost: CostModel, *, max_batch: int) -> ThroughputModel:
        """Speculation off at every B."""
        return cls.from_cost_model(cost, max_batch=max_batch)


def _interp(xs: Sequence[int], ys: Sequence[float], x: int) -> float:
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    if len(xs) == 1:
        return ys[0]
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + max(slope, 0.0) * (x - xs[-1])


def speed_of(cost: ThroughputModel | Mapping[str, ThroughputModel], name: str) -> ThroughputModel:
    """Worker `name`'s model: the one model of a homogeneous fleet, or its entry."""
    if isinstance(cost, ThroughputModel):
        return cost
    try:
        return cost[name]
    except KeyError:
        raise KeyError(f"no throughput model for worker {name!r}") from None


def speculative_speed(
    cost: CostModel, *, max_batch: int, drafter: str, acceptance: float, max_k: int
) -> ThroughputModel:
    """Convenience: one drafter with i.i.d. per-position acceptance `acceptance`."""
    if drafter == OFF:
        return ThroughputModel.plain(cost, max_batch=max_batch)
    cand = Candidate(drafter, FixedAcceptance((acceptance,)))
    return ThroughputModel.from_cost_model(
        cost, max_batch=max_batch, candidates=[cand], max_k=max_k
    )


@dataclass(frozen=True)
class MigrationCost:
    """What moving samples costs, per mode (vLLM has no live migration: docs/cpu-notes.md §2).

    recompute: abort at the source, resubmit prompt + generated tokens at the destination with
    max_tokens reduced; the destination prefills the context (its engine does no decoding
    meanwhile). kv_transfer: ship the KV cache (bytes per context token over a link);
    unavailable while kv_bytes_per_token or the bandwidth is 0. Every order (one source, one
    destination, any number of samples) pays `order_seconds` once (abort round trip, hand-over
    through Redis, resubmit); every sample pays `per_sample_seconds` (its state) plus its mode's
    cost. `mode="auto"` takes the cheaper mode per sample.
    """

    order_seconds: float = 0.05
    per_sample_seconds: float = 0.002
    prefill_seconds_per_token: float | None = None
    """None: the destination's ThroughputModel.prefill_seconds_per_token."""
    kv_bytes_per_token: float = 0.0
    kv_bandwidth_bytes_per_second: float = 0.0
    kv_fixed_seconds: float = 0.0
    """Per sample, on top of the bytes (connector set-up, block table hand-over)."""
    mode: ModePolicy = "auto"

    def __post_init__(self) -> None:
        values = (self.order_seconds, self.per_sample_seconds, self.kv_fixed_seconds)
        if min(*values, self.kv_bytes_per_token, self.kv_bandwidth_bytes_per_second) < 0.0:
            raise ValueError(f"negative cost in {self}")
        if self.prefill_seconds_per_token is not None and self.prefill_seconds_per_token < 0:
            raise ValueError(f"negative prefill cost in {self}")

    @property
    def kv_available(self) -> bool:
        return self.kv_bytes_per_token > 0.0 and self.kv_bandwidth_bytes_per_second > 0.0

    def prefill_seconds(self, context_tokens: int, destination: ThroughputModel) -> float:
        per_token = self.prefill_seconds_per_token
        if per_token is None:
            per_token = destination.prefill_seconds_per_token
        return context_tokens * per_token

    def recompute_seconds(self, context_tokens: int, destination: ThroughputModel) -> float:
        """One sample by recompute, order cost excluded."""
        return self.per_sample_seconds + self.prefill_seconds(context_tokens, destination)

    def kv_transfer_seconds(self, context_tokens: int) -> float | None:
        """One sample by KV copy, order cost excluded; None without a KV path."""
        if not self.kv_available:
            return None
        transfer = context_tokens * self.kv_bytes_per_token / self.kv_bandwidth_bytes_per_second
        return self.per_sample_seconds + self.kv_fixed_seconds + transfer

    def engine_seconds(
        self, mode: MigrationMode, context_tokens: int, destination: ThroughputModel
    ) -> float:
        """Engine time one sample's move consumes (the destination decodes nothing else
        meanwhile): its hand-over work plus a recompute's prefill or a KV copy's block set-up.
        The order's round trip and the KV bytes in flight do not stop any engine."""
        if mode == "recompute":
            return self.per_sample_seconds + self.prefill_seconds(context_tokens, destination)
        return self.per_sample_seconds + self.kv_fixed_seconds

    def choose(
        self, context_tokens: int, destination: ThroughputModel
    ) -> tuple[MigrationMode, float]:
        """(mode, per-sample seconds). A forced kv_transfer without a KV path recomputes."""
        recompute = self.recompute_seconds(context_tokens, destination)
        kv = self.kv_transfer_seconds(context_tokens)
        if kv is None or self.mode == "recompute":
            return "recompute", recompute
        if self.mode == "kv_transfer" or kv < recompute:
            return "kv_transfer", kv
        return "recompute", recompute


@dataclass(frozen=True)
class Migration:
    """Move one sample: what the coordinator turns into a MigrationOrder."""

    sample_id: str
    source: str
    destination: str
    mode: MigrationMode
    cost_seconds: float
    """Delay until the sample decodes again: its own cost plus its share of the order's."""
    predicted_gain_seconds: float
    """Its share of the predicted reduction of the (source, destination) finish time."""
    destination_busy_seconds: float = 0.0
    """Destination engine time the move consumes (`MigrationCost.engine_seconds`)."""
