"""The drafting-strategy selector: (cost model, acceptance, batch size) -> (drafter, k).

Place in the flow: the coordinator (or each worker between steps) has a calibrated `CostModel`
and pooled `AcceptanceEstimator`s; every step, or whenever the number of running sequences B
changes, it asks for the (drafter, k) that maximises expected emitted tokens per second

    tokens/s(d, k) = B * (E_d[accepted | k] + 1) / (verify(B, k + 1) + draft_d(B, k)),

with k = 0 ("off") always a candidate. This is the RLHFSpec paper's core decision:
large k wastes verification compute while B is large, small k leaves the card idle in the
long tail. `AdaptiveSelector` adds hysteresis so noisy acceptance does not flip the engine
between near-equal choices; `selector_table` precomputes the choice per batch-size bucket,
which the coordinator broadcasts (versioned) and from which a vLLM
`num_speculative_tokens_per_batch_size` schedule can be derived.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .acceptance import AcceptanceModel
from .cost_model import CostModel
from .cost_records import OFF
from .draft_choice import BatchRange, DraftChoice


@dataclass(frozen=True)
class Candidate:
    """A drafter the engine can use, with its current acceptance estimate.

    max_k caps k for this drafter (e.g. the engine's num_speculative_tokens for it).
    """

    drafter: str
    acceptance: AcceptanceModel
    max_k: int | None = None


@dataclass(frozen=True)
class SelectorInput:
    batch_size: int
    candidates: tuple[Candidate, ...]
    max_k: int
    cost_model: CostModel
    k_values: tuple[int, ...] | None = None
    """k values allowed (0 is always added); None: every k in 0..max_k."""


@dataclass(frozen=True)
class ScoredChoice:
    """A drafting strategy (drafter, k) with its predicted throughput at the batch size it was
    scored for."""

    drafter: str
    k: int
    tokens_per_second: float
    speedup: float
    """tokens_per_second relative to plain decoding (k = 0) at the same batch size."""

    @property
    def enabled(self) -> bool:
        return self.drafter != OFF and self.k > 0

    @property
    def strategy(self) -> DraftChoice:
        return DraftChoice(self.drafter, self.k)


def evaluate(
    drafter: str,
    acceptance: AcceptanceModel | None,
    batch_size: int,
    k: int,
    cost_model: CostModel,
) -> ScoredChoice:
    """Score one strategy. Also the hindsight tool: pass the true acceptance to learn what a
    choice actually delivered."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    base = batch_size / cost_model.verify_seconds(batch_size, 0)
    if drafter == OFF or k == 0:
        return ScoredChoice(OFF, 0, base, 1.0)
    if acceptance is None:
        raise ValueError(f"drafter {drafter!r} needs an acceptance model")
    emitted = acceptance.expected_accepted(k) + 1.0  # accepted drafts + the bonus token
    tps = batch_size * emitted / step_seconds(drafter, acceptance, batch_size, k, cost_model)
    return ScoredChoice(drafter, k, tps, tps / base)


def step_seconds(
    drafter: str, acceptance: AcceptanceModel, batch_size: int, k: int, cost_model: CostModel
) -> float:
    """Predicted step time: drafting k tokens, then verifying what was really proposed. A
    drafter that knows its fill (``expected_draft_tokens``: rows without a match propose
    nothing, matches can be short) verifies 1 + that many tokens per row, not 1 + k."""
    fill = getattr(acceptance, "expected_draft_tokens", None)
    if fill is None:
        return cost_model.step_seconds(drafter, batch_size, k)
    tokens = 1.0 + min(float(k), max(0.0, float(fill(k))))
    return cost_model.verify_tokens_seconds(batch_size, tokens) + cost_model.draft_seconds(
        drafter, batch_size, k
    )


def _k_values(inp: SelectorInput, cand: Candidate) -> list[int]:
    cap = inp.max_k if cand.max_k is None else min(inp.max_k, cand.max_k)
    ks = range(1, inp.max_k + 1) if inp.k_values is None else inp.k_values
    return sorted({k for k in ks if 1 <= k <= cap})


def score_all(inp: SelectorInput) -> list[ScoredChoice]:
    """Every allowed strategy, best first. Ties go to the smaller k (less verification spent
    for the same return), with "off" winning any exact tie."""
    options = [evaluate(OFF, None, inp.batch_size, 0, inp.cost_model)]
    for cand in inp.candidates:
        if cand.drafter == OFF:
            raise ValueError(f"{OFF!r} is implicit; do not pass it as a candidate")
        for k in _k_values(inp, cand):
            options.append(
                evaluate(cand.drafter, cand.acceptance, inp.batch_size, k, inp.cost_model)
            )
    return sorted(options, key=lambda c: (-c.tokens_per_second, c.k, c.drafter != OFF))


def choose(inp: SelectorInput) -> ScoredChoice:
    """The throughput-maximising strategy for this input (stateless)."""
    return score_all(inp)[0]


class AdaptiveSelector:
    """`choose` with hysteresis, for use every decode step.

    Keeps the current strategy unless another is predicted better by more than `margin`
    (relative): acceptance estimates are noisy, and each switch has a cost the model does not
    see (a changed k changes the scheduler's token budget; a changed drafter may need warm-up).
    When B has moved by `rebucket_factor` or more since the current choice was made, the
    margin is dropped and the best strategy is taken outright: a large batch-size change is a
    real change of regime, not noise (on CPU, k=8 at B=64 and acceptance 0.5 measured 0.44-0.52x
    of plain decoding where k=1 gave 1.1x: docs/cpu-notes.md §3).
    """

    def __init__(
        self,
        cost_model: CostModel,
        max_k: int,
        *,
        margin: float = 0.04,
        rebucket_factor: float = 2.0,
        k_values: Sequence[int] | None = None,
    ) -> None:
        if margin < 0 or rebucket_factor <= 1.0:
            raise ValueError("need margin >= 0 and rebucket_factor > 1")
        self.cost_model = cost_model
        self.max_k = max_k
        self.margin = margin
        self.rebucket_factor = rebucket_factor
        self.k_values = None if k_values is None else tuple(k_values)
        self.current: ScoredChoice | None = None
        self.anchor_batch: int | None = None
        self.switches = 0

    def select(self, batch_size: int, candidates: Iterable[Candidate]) -> ScoredChoice:
        inp = SelectorInput(
            batch_size, tuple(candidates), self.max_k, self.cost_model, self.k_values
        )
        options = score_all(inp)
        best = options[0]
        if self.current is None or self.anchor_batch is None:
            return self.adopt(best, batch_size)
        ratio = max(batch_size, self.anchor_batch) / min(batch_size, self.anchor_batch)
        if ratio >= self.rebucket_factor:
            return self.adopt(best, batch_size)
        now = next((c for c in options if c.strategy == self.current.strategy), None)
        if now is None:  # drafter withdrawn or k no longer allowed
            return self.adopt(best, batch_size)
        if best.tokens_per_second > now.tokens_per_second * (1.0 + self.margin):
            return self.adopt(best, batch_size)
        self.current = now  # same strategy, refreshed prediction
        return now

    def adopt(self, choice: ScoredChoice, batch_size: int) -> ScoredChoice:
        if self.current is not None and self.current.strategy != choice.strategy:
            self.switches += 1
        self.current = choice
        self.anchor_batch = batch_size
        return choice


# -- strategy tables -----------------------------------------------------------------------------


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... doubling up to max_batch (always included)."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    out = [1]
    while out[-1] * 2 < max_batch:
        out.append(out[-1] * 2)
    if out[-1] != max_batch:
        out.append(max_batch)
    return tuple(out)


@dataclass(frozen=True)
class SelectorEntry:
    """Batch sizes lo..hi (inclusive) use (drafter, k); predictions are for B = hi."""

    lo: int
    hi: int
    drafter: str
    k: int
    tokens_per_second: float
    speedup: float

    @property
    def range(self) -> BatchRange:
        return BatchRange(self.lo, self.hi, self.drafter, self.k)


@dataclass(frozen=True)
class SelectorTable:
    """Versioned map from batch size to strategy, with the selector's predictions. The
    coordinator broadcasts its ranges as a ``messages.StrategyTable`` (``coordinator.strategy``
    converts)."""

    version: int
    entries: tuple[SelectorEntry, ...]

    def lookup(self, batch_size: int) -> SelectorEntry:
        """The entry covering batch_size; past the last bucket, the last entry."""
        for e in self.entries:
            if batch_size <= e.hi:
                return e
        return self.entries[-1]

    @property
    def ranges(self) -> tuple[BatchRange, ...]:
        return tuple(e.range for e in self.entries)

    @property
    def drafters(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.drafter for e in self.entries if e.drafter != OFF))

    def to_batch_size_schedule(self, *, upper: int | None = None) -> list[list[int]]:
        """vLLM-style [[lo, hi, k], ...] for a single-drafter table ("off" rows become k=0);
        adjacent rows with equal k are merged; `upper` extends the last row's hi."""
        if len(self.drafters) > 1:
            raise ValueError(
                f"table mixes drafters {self.drafters}; build one per drafter with "
                "selector_table(..., candidates=[that drafter])"
            )
        rows: list[list[int]] = []
        for e in self.entries:
            k = 0 if e.drafter == OFF else e.k
            if rows and rows[-1][2] == k:
                rows[-1][1] = e.hi
            else:
                rows.append([e.lo, e.hi, k])
        if upper is not None and rows and upper > rows[-1][1]:
            rows[-1][1] = upper
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SelectorTable:
        return cls(int(d["version"]), tuple(SelectorEntry(**e) for e in d["entries"]))


def selector_table(
    buckets: Sequence[int],
    candidates: Sequence[Candidate],
    cost_model: CostModel,
    max_k: int,
    *,
    k_values: Sequence[int] | None = None,
    version: int = 0,
) -> SelectorTable:
    """Best strategy per bucket. Bucket b covers (previous bucket, b] and is scored at its upper
    end b: within a bucket the largest B favours the smallest k, and a k too small costs far
    less than a k too large (docs/cpu-notes.md §3)."""
    bs = sorted(set(buckets))
    if not bs or bs[0] < 1:
        raise ValueError("buckets must be non-empty and >= 1")
    ks = None if k_values is None else tuple(k_values)
    entries = []
    lo = 1
    for b in bs:
        c = choose(SelectorInput(b, tuple(candidates), max_k, cost_model, ks))
        entries.append(SelectorEntry(lo, b, c.drafter, c.k, c.tokens_per_second, c.speedup))
        lo = b + 1
    return SelectorTable(version, tuple(entries))


# -- hindsight (benchmarks) ----------------------------------------------------------------------


def oracle_choice(
    batch_size: int,
    true_acceptance: Mapping[str, AcceptanceModel],
    cost_model: CostModel,
    max_k: int,
    *,
    k_values: Sequence[int] | None = None,
) -> ScoredChoice:
    """The best strategy had the true acceptance been known: the benchmark's upper bound."""
    cands = tuple(Candidate(d, a) for d, a in true_acceptance.items())
    ks = None if k_values is None else tuple(k_values)
    return choose(SelectorInput(batch_size, cands, max_k, cost_model, ks))


def hindsight_schedule(
    batch_sizes: Iterable[int],
    true_acceptance: Mapping[str, AcceptanceModel],
    cost_model: CostModel,
    max_k: int,
    *,
    k_values: Sequence[int] | None = None,
) -> dict[int, ScoredChoice]:
    """oracle_choice for each batch size (e.g. every B a run went through)."""
    return {
        b: oracle_choice(b, true_acceptance, cost_model, max_k, k_values=k_values)
        for b in sorted(set(batch_sizes))
    }
