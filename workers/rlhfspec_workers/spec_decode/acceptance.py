"""Acceptance estimation: how many draft tokens a drafter gets accepted, per draft position.

Place in the flow: in each generation worker the drafting strategy (``generation.draft_strategy``)
turns every decode step's outcome, as the proposer saw it, into a `StepStats` for one
`AcceptanceEstimator` per drafter. The worker reports per-(drafter, k) counts to the coordinator
(``messages.AcceptanceReport``), whose own estimators pool every worker's evidence for the strategy
table; a worker merges the pooled rates back in (`merge`). The selector only needs
`expected_accepted(k)`. `SpecDecodeCounters` / `counters_delta` (vLLM's cumulative counters as
deltas) and `pool` are used only by tests.

Model: position i of a draft is reached only if positions 0..i-1 were accepted, so we estimate
the conditional rate p_i = P(i accepted | i-1 accepted) for each position and get
E[accepted | k] = sum_{i<k} prod_{j<=i} p_j (the gpt-fast / vLLM acceptance-per-position view).
Each p_i is a Beta-posterior mean over exponentially-decayed counts: the prior gives an unseen
drafter a sensible, modest estimate; the decay (a half-life in drafts) lets the estimate follow
the policy as weight syncs move it: a drafter left stale by a weight sync silently falls to ~1.0
accepted length (`collapsed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

VLLM_NUM_DRAFTS = "vllm:spec_decode_num_drafts"
VLLM_NUM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
VLLM_NUM_ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens"
VLLM_NUM_ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


class AcceptanceModel(Protocol):
    """All the selector needs to know about a drafter's acceptance."""

    def expected_accepted(self, k: int) -> float: ...


@dataclass(frozen=True)
class FixedAcceptance:
    """Known per-position conditional rates (benchmarks' ground truth, tests, oracles).

    `rates[i]` = P(position i accepted | i-1 accepted); positions past the end reuse the last
    rate, so `FixedAcceptance((0.8,))` is the classic i.i.d. acceptance 0.8.
    """

    rates: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.rates or any(not 0.0 <= r <= 1.0 for r in self.rates):
            raise ValueError(f"rates must be non-empty and within [0, 1]: {self.rates}")

    def rate(self, position: int) -> float:
        return self.rates[min(position, len(self.rates) - 1)]

    def expected_accepted(self, k: int) -> float:
        return expected_accepted_from_rates([self.rate(i) for i in range(k)])


def expected_accepted_from_rates(rates: Sequence[float]) -> float:
    """E[accepted] of a draft whose position i is accepted with conditional rate rates[i]."""
    total, survive = 0.0, 1.0
    for p in rates:
        survive *= p
        total += survive
    return total


# -- counters -> per-step stats ----------------------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    """Spec-decode outcome over one interval (one step, or any run of steps).

    accepted_per_pos[i]: number of drafts whose position i was accepted (vLLM's per-position
    counter, so it is non-increasing in i). draft_len: tokens proposed per draft in this
    interval; None infers round(num_draft_tokens / num_drafts), exact for fixed-k drafters.
    """

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_pos: tuple[int, ...] = ()
    draft_len: int | None = None

    def __post_init__(self) -> None:
        if min(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens) < 0:
            raise ValueError(f"negative counts in {self}")
        if any(a < 0 for a in self.accepted_per_pos):
            raise ValueError(f"negative per-position counts in {self}")

    @property
    def mean_accepted_length(self) -> float:
        """vLLM's 'mean acceptance length': accepted draft tokens + the bonus token per draft."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else math.nan


@dataclass(frozen=True)
class SpecDecodeCounters:
    """One snapshot of vLLM's cumulative spec-decode counters (one engine)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = ()

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float | Sequence[float]]) -> SpecDecodeCounters:
        """From {metric name: value} as one engine reports them (`GenerationEngine.counters()`;
        a vector for the per-position counter)."""

        def scalar(name: str) -> int:
            v = metrics.get(name, 0)
            if isinstance(v, int | float):
                return int(v)
            raise TypeError(f"{name} should be a number, got {v!r}")

        per_pos = metrics.get(VLLM_NUM_ACCEPTED_PER_POS, ())
        if isinstance(per_pos, int | float):
            raise TypeError(f"{VLLM_NUM_ACCEPTED_PER_POS} should be a vector")
        return cls(
            scalar(VLLM_NUM_DRAFTS),
            scalar(VLLM_NUM_DRAFT_TOKENS),
            scalar(VLLM_NUM_ACCEPTED_TOKENS),
            tuple(int(x) for x in per_pos),
        )


def counters_delta(
    prev: SpecDecodeCounters | None, curr: SpecDecodeCounters, *, draft_len: int | None = None
) -> StepStats:
    """What happened between two cumulative snapshots.

    A counter that went down means the engine restarted (counters start again from zero), so
    the whole current snapshot is the delta; `prev=None` is the first snapshot.
    """
    zero = SpecDecodeCounters()
    base = prev or zero
    n = max(len(base.accepted_per_pos), len(curr.accepted_per_pos))
    b_pos = list(base.accepted_per_pos) + [0] * (n - len(base.accepted_per_pos))
    c_pos = list(curr.accepted_per_pos) + [0] * (n - len(curr.accepted_per_pos))
    went_down = (
        curr.num_drafts < base.num_drafts
        or curr.num_draft_tokens < base.num_draft_tokens
        or curr.num_accepted_tokens < base.num_accepted_tokens
        or any(c < b for b, c in zip(b_pos, c_pos, strict=True))
    )
    if went_down:
        base, b_pos = zero, [0] * n
    return StepStats(
        curr.num_drafts - base.num_drafts,
        curr.num_draft_tokens - base.num_draft_tokens,
        curr.num_accepted_tokens - base.num_accepted_tokens,
        tuple(c - b for b, c in zip(b_pos, c_pos, strict=True)),
        draft_len,
    )


# -- estimator --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BetaPrior:
    """Prior belief about a drafter before (or beyond) evidence.

    mean: P(first draft token accepted) for an unseen drafter. strength: how many drafts of
    evidence it is worth. position_decay: the prior of position i is this fraction of the
    estimate at position i-1, so positions never observed extrapolate downward (conservative:
    overestimating deep positions makes the selector pick a k that wastes verification).
    """

    mean: float = 0.5
    strength: float = 4.0
    position_decay: float = 0.9

    def __post_init__(self) -> None:
        if not (0.0 <= self.mean <= 1.0 and self.strength > 0 and 0 < self.position_decay <= 1):
            raise ValueError(f"invalid prior {self}")


@dataclass
class AcceptanceEstimator:
    """Exponentially-weighted, Beta-smoothed per-position acceptance of one drafter.

    Evidence is (successes, trials) per position plus aggregate (drafts, accepted tokens), all
    decayed by 0.5 ** (drafts_in_update / half_life_drafts) before each update: the half-life
    is counted in drafts (sequence-steps), so a batch of 64 ages the past as much as 64 steps
    at batch 1 and the estimate does not depend on how stats were chunked into updates.

    After a drop in acceptance, position 0 follows within a few half-lives; deeper positions
    lag, because fewer drafts now reach them to provide new evidence. When the caller knows
    the policy just changed (a weight sync), `forget(0.1)` or so shortens that lag for all.
    """

    drafter: str
    prior: BetaPrior = field(default_factory=BetaPrior)
    half_life_drafts: float = 500.0
    collapse_length: float = 1.1
    collapse_min_drafts: float = 100.0
    successes: list[float] = field(default_factory=list)
    trials: list[float] = field(default_factory=list)
    drafts: float = 0.0
    accepted_tokens: float = 0.0
    fill_asked: list[float] = field(default_factory=list)
    fill_got: list[float] = field(default_factory=list)
    """Draft fill per position: rows asked for more than i tokens, and how many of those got
    more than i. A model-free drafter proposes only where it finds a match (often a few rows
    of the batch, short drafts), and vLLM verifies only the tokens proposed: the step costs
    what was drafted, not batch x k (see :meth:`expected_draft_tokens`)."""

    def __post_init__(self) -> None:
        if self.half_life_drafts <= 0:
            raise ValueError("half_life_drafts must be > 0 (math.inf: never forget)")
        if len(self.successes) != len(self.trials):
            raise ValueError("successes and trials must have the same length")

    # -- evidence in ------------------------------------------------------------------------

    def update(self, stats: StepStats) -> None:
        """Fold in one interval's stats (one drafter, one engine)."""
        if stats.num_drafts == 0:
            return
        self.forget(0.5 ** (stats.num_drafts / self.half_life_drafts))
        self.drafts += stats.num_drafts
        self.accepted_tokens += stats.num_accepted_tokens
        length = stats.draft_len
        if length is None:
            length = round(stats.num_draft_tokens / stats.num_drafts)
        # Positions at or past the draft length were not proposed this interval; vLLM still
        # reports them (as zeros) when k < num_speculative_tokens, and counting them would
        # read as rejections.
        length = min(length, len(stats.accepted_per_pos))
        reached = float(stats.num_drafts)
        for i in range(length):
            accepted = min(float(stats.accepted_per_pos[i]), reached)
            self._grow(i + 1)
            self.successes[i] += accepted
            self.trials[i] += reached
            reached = accepted
            if reached == 0.0:
                break  # nothing reached deeper positions: no trials there

    def update_positions(
        self, trials: Sequence[float], successes: Sequence[float], accepted_tokens: float = 0.0
    ) -> None:
        """Fold in per-position evidence observed directly: ``trials[i]`` drafts whose
        position i was checked, ``successes[i]`` of them accepted there (for drafts scored
        against tokens the target emitted anyway, where deeper positions go unobserved once
        the emitted tokens run out, so trials need not follow acceptance). Ages the past by
        ``trials[0]`` drafts, as :meth:`update` does."""
        drafts = float(trials[0]) if trials else 0.0
        if drafts <= 0:
            return
        self.forget(0.5 ** (drafts / self.half_life_drafts))
        self.drafts += drafts
        self.accepted_tokens += accepted_tokens
        for i, (n, s) in enumerate(zip(trials, successes, strict=True)):
            if n <= 0:
                break
            self._grow(i + 1)
            self.successes[i] += min(float(s), float(n))
            self.trials[i] += float(n)

    def update_fill(self, asked: Sequence[float], got: Sequence[float]) -> None:
        """Fold in one step's draft fill (per position, see ``fill_asked``); aged with the
        acceptance evidence by :meth:`update` / :meth:`update_positions`."""
        for i, (n, g) in enumerate(zip(asked, got, strict=True)):
            if n <= 0:
                break
            while len(self.fill_asked) <= i:
                self.fill_asked.append(0.0)
                self.fill_got.append(0.0)
            self.fill_asked[i] += float(n)
            self.fill_got[i] += min(float(g), float(n))

    def expected_draft_tokens(self, k: int) -> float:
        """Mean tokens a row gets proposed when k are asked for (<= k): what verification
        pays for."""
        return sum(self.fill_rates(k))

    def fill_rates(self, k: int) -> list[float]:
        """Share of rows asked whose draft has more than i tokens, i = 0..k-1: posterior means
        chained from the one before (a row cannot get more than i tokens without more than
        i - 1), starting from a full draft, so a drafter never seen costs the full k."""
        out, before = [], 1.0
        a = self.prior.strength
        for i in range(k):
            n = self.fill_asked[i] if i < len(self.fill_asked) else 0.0
            g = self.fill_got[i] if i < len(self.fill_got) else 0.0
            before = (a * before + g) / (a + n)
            out.append(before)
        return out

    def forget(self, factor: float) -> None:
        """Scale all evidence by `factor` in [0, 1]; call with e.g. 0.1 right after a weight
        sync so the next few steps dominate without discarding everything."""
        if not 0.0 <= factor <= 1.0:
            raise ValueError("factor must be in [0, 1]")
        self.successes = [s * factor for s in self.successes]
        self.trials = [t * factor for t in self.trials]
        self.drafts *= factor
        self.accepted_tokens *= factor
        self.fill_asked = [n * factor for n in self.fill_asked]
        self.fill_got = [g * factor for g in self.fill_got]

    def _grow(self, n: int) -> None:
        while len(self.trials) < n:
            self.successes.append(0.0)
            self.trials.append(0.0)

    # -- estimates out ----------------------------------------------------------------------

    def rates(self, k: int) -> list[float]:
        """Conditional acceptance p_0..p_{k-1}: Beta posterior means with chained priors."""
        out: list[float] = []
        prior_mean = self.prior.mean
        a = self.prior.strength
        for i in range(k):
            s = self.successes[i] if i < len(self.successes) else 0.0
            n = self.trials[i] if i < len(self.trials) else 0.0
            p = (a * prior_mean + s) / (a + n)
            out.append(p)
            prior_mean = self.prior.position_decay * p
        return out

    def rate(self, position: int) -> float:
        return self.rates(position + 1)[position]

    def expected_accepted(self, k: int) -> float:
        """E[accepted draft tokens per draft] when proposing k tokens."""
        return expected_accepted_from_rates(self.rates(k))

    @property
    def mean_accepted_length(self) -> float:
        """Decayed mean of (accepted + 1) per draft; NaN before any evidence."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts > 0 else math.nan

    @property
    def collapsed(self) -> bool:
        """The drafter has stopped helping: ~1.0 accepted length over enough recent drafts.

        Uses decayed counts, so keep collapse_min_drafts below ~1.44 x half_life_drafts (the
        most decayed evidence can add up to) or the flag can never rise.
        """
        return (
            self.drafts >= self.collapse_min_drafts
            and self.mean_accepted_length <= self.collapse_length
        )

    # -- pooling and serialisation ----------------------------------------------------------

    def merge(self, other: AcceptanceEstimator) -> AcceptanceEstimator:
        """Pool two workers' evidence for the same drafter (sums: associative, commutative).
        Settings (prior, half-life, collapse thresholds) come from `self`."""
        if other.drafter != self.drafter:
            raise ValueError(f"cannot merge {other.drafter!r} into {self.drafter!r}")
        n = max(len(self.trials), len(other.trials))

        def padded(xs: list[float]) -> list[float]:
            return xs + [0.0] * (n - len(xs))

        return AcceptanceEstimator(
            self.drafter,
            self.prior,
            self.half_life_drafts,
            self.collapse_length,
            self.collapse_min_drafts,
            [a + b for a, b in zip(padded(self.successes), padded(other.successes), strict=True)],
            [a + b for a, b in zip(padded(self.trials), padded(other.trials), strict=True)],
            self.drafts + other.drafts,
            self.accepted_tokens + other.accepted_tokens,
            _add(self.fill_asked, other.fill_asked),
            _add(self.fill_got, other.fill_got),
        )

    def copy(self) -> AcceptanceEstimator:
        return AcceptanceEstimator.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (an infinite half-life is written as None)."""
        half_life = None if math.isinf(self.half_life_drafts) else self.half_life_drafts
        return {
            "drafter": self.drafter,
            "prior": {
                "mean": self.prior.mean,
                "strength": self.prior.strength,
                "position_decay": self.prior.position_decay,
            },
            "half_life_drafts": half_life,
            "collapse_length": self.collapse_length,
            "collapse_min_drafts": self.collapse_min_drafts,
            "successes": list(self.successes),
            "trials": list(self.trials),
            "drafts": self.drafts,
            "accepted_tokens": self.accepted_tokens,
            "fill_asked": list(self.fill_asked),
            "fill_got": list(self.fill_got),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AcceptanceEstimator:
        hl = d.get("half_life_drafts")
        return cls(
            str(d["drafter"]),
            BetaPrior(**d.get("prior", {})),
            math.inf if hl is None else float(hl),
            float(d.get("collapse_length", 1.1)),
            float(d.get("collapse_min_drafts", 100.0)),
            [float(x) for x in d.get("successes", [])],
            [float(x) for x in d.get("trials", [])],
            float(d.get("drafts", 0.0)),
            float(d.get("accepted_tokens", 0.0)),
            [float(x) for x in d.get("fill_asked", [])],
            [float(x) for x in d.get("fill_got", [])],
        )


def _add(a: Sequence[float], b: Sequence[float]) -> list[float]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0.0) + (b[i] if i < len(b) else 0.0) for i in range(n)]


def pool(estimators: Iterable[AcceptanceEstimator]) -> dict[str, AcceptanceEstimator]:
    """Coordinator side: pool every worker's estimators, grouped by drafter name."""
    out: dict[str, AcceptanceEstimator] = {}
    for e in estimators:
        out[e.drafter] = out[e.drafter].merge(e) if e.drafter in out else e.copy()
    return out
