"""Calibration: time the engine's verification steps and draft forwards for the cost model.

Where it sits: at worker start (``SelectorSpec.calibrate``), before the first RL iteration,
``calibration_run.calibrate_engine`` runs one :func:`probe` per cell of
``spec_decode.calibration_plan`` (in ``calibration_order``) and per drafter and batch size,
under a deadline; the results feed ``spec_decode.CostModel`` (cached per model and hardware
by the caller). :func:`measure_verify` / :func:`measure_drafter` are the unbounded versions
(tests, benchmarks).

How: verification cost does not depend on what is drafted, only on how much, so a
``FillDrafter`` proposes exactly k copies of a token (free to make, almost always rejected:
every step then costs verify(B, k + 1) and emits one token per row). Steps are read from the
engine's own :class:`StepRecord`s, the same numbers the selector sees later. A probe is short
(one warm-up step, a few steady ones, short prompts) and checks its deadline after every
engine step, so a calibration overruns its budget by at most one step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from rlhfspec_workers.drafters.base import DraftRow
from rlhfspec_workers.spec_decode.cost_records import CostSample, DrafterCost

from .draft_strategy import DraftChoice, FixedStrategy
from .engine import GenerationEngine
from .records import PromptInput, SamplingConfig, StepRecord

FILL = "fill"


class FillDrafter:
    """k copies of the row's last token: a cost probe, never a real drafter."""

    name = FILL

    def propose(self, rows: Sequence[DraftRow], k: int) -> list[list[int]]:
        return [[int(r.tokens[-1])] * min(k, r.max_k) for r in rows]

    def release(self, req_ids: Iterable[str]) -> None:
        pass


@contextmanager
def _strategy_kept(engine: GenerationEngine) -> Iterator[None]:
    """Calibration switches strategies; the caller's comes back afterwards."""
    saved = engine.proposer.strategy if engine.proposer is not None else None
    try:
        yield
    finally:
        if saved is not None:
            engine.set_strategy(saved)


def probe_prompts(batch_size: int, prompt_len: int, vocab: int) -> list[PromptInput]:
    # Distinct prompts: prefix caching must not make the rows cheaper than real ones. Ids stay
    # in 3..vocab-1 (small vocabularies keep specials below 3); two leading tokens spell the
    # row index, so rows stay distinct even with a 32-token vocabulary.
    span = max(vocab - 3, 1)
    return [
        PromptInput(
            [3 + (i // span) % span, 3 + i % span]
            + [3 + (7 * i + 13 * j) % span for j in range(prompt_len - 2)],
            f"cal{i}",
        )
        for i in range(batch_size)
    ]


def vocab_size(engine: GenerationEngine) -> int:
    return int(engine.engine.model_config.get_vocab_size())


def _run(
    engine: GenerationEngine, choice: DraftChoice, batch_size: int, steps: int, prompt_len: int
) -> list[float]:
    """Verification seconds of steady steps (batch_size rows, drafts of choice.k verified)."""
    if engine.proposer is None:
        raise RuntimeError("calibration needs the adaptive proposer (not mode off / native)")
    engine.proposer.drafters.setdefault(FILL, FillDrafter())
    engine.set_strategy(FixedStrategy(choice))
    engine.drain_steps()
    sampling = SamplingConfig(temperature=0.0, max_tokens=steps + 3, ignore_eos=True)
    prompts = probe_prompts(batch_size, prompt_len, vocab_size(engine))
    for _ in engine.generate(prompts, sampling):
        pass
    # Steady steps only: every row verified a full k-token draft (rows near max_tokens get
    # shorter drafts, the prefill step none), and nobody finished.
    records = [
        r
        for r in engine.drain_steps()
        if r.batch_size == batch_size
        and r.num_finished == 0
        and r.k == choice.k
        and r.num_draft_tokens == (batch_size * choice.k if choice.enabled else 0)
    ]
    # Step wall time minus the drafting done inside it = the step as the cost model sees it.
    return [r.step_seconds - r.draft_seconds for r in records[1:]]


def measure_verify(
    engine: GenerationEngine,
    plan: Sequence[tuple[int, int]],
    *,
    steps: int = 8,
    repeats: int = 2,
    prompt_len: int = 32,
) -> list[CostSample]:
    """One CostSample per plan point and repeat (median of its steady steps); repeats are
    interleaved over the plan so a burst of load on a shared machine hits every point."""
    samples: list[CostSample] = []
    with _strategy_kept(engine):
        for _ in range(repeats):
            for batch_size, tokens_per_seq in plan:
                k = tokens_per_seq - 1
                choice = DraftChoice(FILL, k) if k > 0 else DraftChoice("off", 0)
                seconds = _run(engine, choice, batch_size, steps, prompt_len)
                if seconds:
                    median = statistics.median(seconds)
                    samples.append(CostSample(batch_size, tokens_per_seq, median))
    return samples


def measure_drafter(
    engine: GenerationEngine,
    name: str,
    batches: Sequence[int],
    *,
    k: int = 4,
    steps: int = 8,
    prompt_len: int = 32,
) -> DrafterCost:
    """Per-token draft cost per batch size (median draft_seconds / k of steady steps)."""
    points: list[tuple[int, float]] = []
    with _strategy_kept(engine):
        for batch_size in batches:
            seconds = _draft_seconds(engine, name, batch_size, k, steps, prompt_len)
            if seconds is not None:
                points.append((batch_size, seconds / k))
    return DrafterCost(name, 0.0, tuple(points))


def _draft_seconds(
    engine: GenerationEngine, name: str, batch_size: int, k: int, steps: int, prompt_len: int
) -> float | None:
    """Median seconds one drafting call of ``name`` at k takes for batch_size rows."""
    if engine.proposer is None:
        raise RuntimeError("calibration needs the adaptive proposer")
    engine.set_strategy(FixedStrategy(DraftChoice(name, k)))
    engine.drain_steps()
    sampling = SamplingConfig(temperature=0.0, max_tokens=steps + 3, ignore_eos=True)
    prompts = probe_prompts(batch_size, prompt_len, vocab_size(engine))
    for _ in engine.generate(prompts, sampling):
        pass
    drafting = [
        r.draft_seconds
        for r in engine.drain_steps()
        if r.batch_size == batch_size and r.next_k == k and r.num_finished == 0
    ]
    # The first drafting call also catches the draft model up on the prompts: skip it.
    return statistics.median(drafting[1:]) if len(drafting) > 1 else None


# -- time-bounded probes (calibration_run.calibrate_engine) --------------------------------------

STUCK_STEPS = 3
"""Consecutive steps at one batch size below the one asked for after which a probe measures
that batch instead (rows beyond the engine's KV capacity wait and never join)."""


@dataclass(frozen=True)
class ProbeResult:
    """What one probe measured: per steady step, the whole step and the drafting inside it."""

    step_seconds: tuple[float, ...]
    draft_seconds: tuple[float, ...]
    wall_seconds: float
    batch_size: int
    """Rows the steps ran: the batch asked for, or fewer when the engine cannot run that many
    at once (its KV cache is full; the others wait), which the probe then measures."""

    @property
    def step(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None

    @property
    def draft(self) -> float | None:
        return statistics.median(self.draft_seconds) if self.draft_seconds else None


def probe(
    engine: GenerationEngine,
    choice: DraftChoice,
    batch_size: int,
    *,
    steady: int = 3,
    prompt_len: int = 8,
    deadline: float | None = None,
    measure: str = "verify",
    clock: Callable[[], float] = time.monotonic,
) -> ProbeResult:
    """Run ``batch_size`` rows under ``choice`` until ``steady`` steady steps are recorded
    (after one warm-up step), or until ``deadline`` (``clock`` time) passes, whichever is
    first; then abort the rows. The deadline is checked after every engine step, so a probe
    overruns it by at most one step.

    ``measure="verify"``: steps that verified a full ``choice.k``-token draft on every row
    (the cost of verifying B x (k + 1) tokens). ``measure="draft"``: steps that drafted
    ``choice.k`` tokens with ``choice.drafter`` (its drafting time; the warm-up step skipped is
    the one where a draft model catches up on the prompts)."""
    if engine.proposer is None:
        raise RuntimeError("calibration needs the adaptive proposer (not mode off / native)")
    engine.proposer.drafters.setdefault(FILL, FillDrafter())
    engine.set_strategy(FixedStrategy(choice))
    engine.drain_steps()
    k = choice.k if choice.enabled else 0
    started = clock()
    # Enough tokens that no row finishes (or runs out of room for a full draft) before the
    # probe has its steps, even if every draft were accepted; the probe stops earlier anyway.
    sampling = SamplingConfig(
        temperature=0.0, max_tokens=(steady + 3) * (k + 1) + 2, ignore_eos=True
    )
    prompts = probe_prompts(batch_size, prompt_len, vocab_size(engine))
    ids = [engine.submit(p, sampling, 0) for p in prompts]
    kept: list[StepRecord] = []
    target = batch_size
    recent: list[int] = []
    try:
        while engine.running and len(kept) < steady + 1:
            engine.poll()
            for r in engine.drain_steps():
                if r.num_finished:
                    continue
                recent = [*recent[-(STUCK_STEPS - 1) :], r.batch_size]
                if len(recent) == STUCK_STEPS and len(set(recent)) == 1 and recent[0] < target:
                    target = recent[0]  # the engine runs no more rows than that at once
                    kept = []
                if r.batch_size != target:
                    continue
                if measure == "verify":
                    ok = r.k == k and r.num_draft_tokens == target * k
                else:
                    ok = r.next_drafter == choice.drafter and r.next_k == k
                if ok:
                    kept.append(r)
            if deadline is not None and clock() >= deadline:
                break
    finally:
        engine.abort(ids)
        engine.drain_steps()
    steps = kept[1 : steady + 1]
    return ProbeResult(
        tuple(r.step_seconds for r in steps),
        tuple(r.draft_seconds for r in steps),
        clock() - started,
        target,
    )
