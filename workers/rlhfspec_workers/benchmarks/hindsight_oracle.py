"""The generation benchmark's true hindsight oracle, and the check that it is one.

Where it sits: ``benchmarks.generation`` runs, per iteration, one unmeasured plain-decoding
pass through the adaptive proposer with shadow drafting on (``generation.shadow``), and keeps
the measured runs' step records. :func:`oracle_report` then replays each iteration's batch
(``spec_decode.hindsight``) under:

* every fixed (drafter, k) and plain decoding: the replay's own check. Their replayed
  throughput should match the measured one; the ratio is reported per configuration, and
  the oracle is put into measured currency with the median of those ratios;
* the oracle: at every step the (drafter, k) with the most tokens per second given the
  acceptance each drafter really had there, and a step cost measured in this run (priced for
  the draft tokens the step verifies: :func:`measured_cost`, :func:`token_seconds_of`).

By construction the oracle is at least as fast as every fixed configuration in the replay;
the report says whether it also is against the measured ones, within ``NOISE``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlhfspec_workers.drafters.base import KeepsHistory
from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.generation.shadow import LiveReplay, ShadowDrafts
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.hindsight import (
    OFF,
    Forkable,
    MeasuredCost,
    Replay,
    SequenceTrace,
    StepCost,
    StepTiming,
    Strategy,
    replay_fixed,
    replay_oracle,
    step_cost_table,
)

NOISE = 0.03
"""Run-to-run spread of one configuration's median on this bench (rounds of 3): an oracle
this much below a fixed configuration is still 'at or above it within noise'."""


@dataclass
class IterationTraces:
    """What one iteration's shadow run left: the traces, and a fresh live replay of
    the history-keeping drafters."""

    traces: list[SequenceTrace]
    dynamic: Callable[[], Forkable | None]
    shadow: ShadowDrafts | None = None
    """The shadow run itself (its drafts, for the expectation oracle)."""


def iteration_traces(
    shadow: ShadowDrafts,
    live: Sequence[KeepsHistory],
    max_k: int,
    history: Mapping[str, Sequence[Sequence[int]]] | None,
) -> IterationTraces:
    """One shadow run's traces. The history-keeping drafters in ``live`` (the engine's, for
    their settings) are replayed live instead of read from the shadow run, each a fresh copy
    on top of ``history`` (the previous iteration's rollouts by prompt group)."""
    traces = shadow.traces(exclude=[d.name for d in live])

    def live_replay() -> LiveReplay | None:
        if not live:
            return None
        return LiveReplay(shadow, [d.fresh() for d in live], max_k, history)

    return IterationTraces(traces, live_replay, shadow)


def strategy_of(config: str) -> Strategy | None:
    """``fixed:<drafter>:<k>`` -> (drafter, k); ``k0`` -> off; anything else None."""
    if config == "k0":
        return (OFF, 0)
    if config.startswith("fixed:"):
        _, drafter, k = config.split(":")
        return (drafter, int(k))
    return None


def _timings(
    runs: Iterable[tuple[str, Sequence[StepRecord]]],
    pick: Callable[[Strategy, StepRecord], StepTiming | None],
) -> list[StepTiming]:
    """``pick``'s timing of every step (of at least one row) of every fixed-strategy run."""
    records: list[StepTiming] = []
    for config, steps in runs:
        strategy = strategy_of(config)
        if strategy is None:
            continue
        for step in steps:
            timing = pick(strategy, step) if step.batch_size >= 1 else None
            if timing is not None:
                records.append(timing)
    return records


def measured_cost(
    runs: Iterable[tuple[str, Sequence[StepRecord]]],
    fallback: StepCost,
    token_seconds: Callable[[int], float] | None = None,
) -> MeasuredCost:
    """Step seconds per (strategy, batch size) from fixed-strategy runs through the proposer,
    with the draft tokens each step verified (``MeasuredCost.for_tokens`` prices a replayed
    step's own, given ``token_seconds``: see :func:`token_seconds_of`).

    A step record's drafter/k describe the drafts verified in that step, which the step
    before made; a fixed run verifies the same strategy every step but its first."""

    def verified(strategy: Strategy, step: StepRecord) -> StepTiming:
        drafted = strategy if step.k > 0 or strategy[1] == 0 else (OFF, 0)
        return StepTiming(drafted, step.batch_size, step.step_seconds, step.num_draft_tokens)

    return step_cost_table(_timings(runs, verified), fallback, token_seconds)


def priced_cost(runs: Iterable[tuple[str, Sequence[StepRecord]]], model: CostModel) -> MeasuredCost:
    """:func:`measured_cost` with the calibrated table as the fallback and the per-token
    price: the step costs every replay of the bench charges."""
    return measured_cost(runs, model.step_seconds, token_seconds_of(model))


def measured_draft_cost(
    runs: Iterable[tuple[str, Sequence[StepRecord]]], fallback: StepCost
) -> MeasuredCost:
    """Drafting seconds per (strategy, batch size) from the same fixed runs: the part of each
    step spent drafting the next step's tokens (``StepRecord.draft_seconds``), which a replay
    reports to ours' cost learner as a worker's step records do (``ReplayOptions``)."""

    def drafting(strategy: Strategy, step: StepRecord) -> StepTiming | None:
        if strategy[1] == 0 or step.next_k == 0 or step.prefill_tokens > 0:
            return None
        return StepTiming(strategy, step.batch_size, step.draft_seconds)

    return step_cost_table(_timings(runs, drafting), fallback)


def token_seconds_of(model: CostModel) -> Callable[[int], float]:
    """The calibrated table's marginal verification seconds of one draft token at B rows
    (one more token on every row, over B)."""

    def per_token(batch: int) -> float:
        more = model.verify_tokens_seconds(batch, 2.0) - model.verify_tokens_seconds(batch, 1.0)
        return max(0.0, more / batch)

    return per_token


def tokens_per_second_of(replays: Sequence[Replay]) -> float:
    """Tokens per replayed second over several replays together (0.0 for none)."""
    seconds = sum(r.seconds for r in replays)
    return sum(r.tokens for r in replays) / seconds if seconds > 0 else 0.0


def oracle_report(
    iterations: Sequence[IterationTraces],
    cost: StepCost,
    strategies: Sequence[Strategy],
    measured: Mapping[str, float],
    measured_by_iteration: Sequence[Mapping[str, float]] = (),
) -> dict[str, Any]:
    """Replays of every fixed configuration and of the oracle, per iteration and overall.

    The oracle's schedule of an iteration is its own or a fixed one, whichever finishes the
    batch sooner: so it is at or above every fixed configuration by construction
    (``fixed_won`` counts the iterations where a fixed schedule was kept).

    ``measured``: config -> median tokens/s over the whole run; ``measured_by_iteration``:
    the same per iteration."""
    configs = {"k0": (OFF, 0), **{f"fixed:{d}:{k}": (d, k) for d, k in strategies}}
    fixed: dict[str, list[Replay]] = {name: [] for name in configs}
    oracle: list[Replay] = []
    fixed_won = 0
    for it in iterations:
        for name, strategy in configs.items():
            fixed[name].append(replay_fixed(it.traces, cost, strategy, it.dynamic()))
        own = replay_oracle(it.traces, cost, strategies, it.dynamic())
        quickest = min((r[-1] for r in fixed.values()), key=lambda r: r.seconds)
        kept = quickest if quickest.seconds < own.seconds else own
        fixed_won += kept is quickest
        oracle.append(kept)

    replayed = {name: tokens_per_second_of(r) for name, r in fixed.items()}
    agreement = {
        name: round(measured[name] / value, 3)
        for name, value in replayed.items()
        if value > 0 and measured.get(name, 0) > 0
    }
    scale = statistics.median(agreement.values()) if agreement else 1.0
    oracle_tps = tokens_per_second_of(oracle)
    best_fixed = max(
        (n for n in measured if n.startswith("fixed:")), key=lambda n: measured[n], default=None
    )
    per_iteration = []
    for i, replay in enumerate(oracle):
        row: dict[str, Any] = {
            "iteration": i,
            "replayed_tokens_per_second": round(replay.tokens_per_second, 2),
            "tokens_per_second": round(replay.tokens_per_second * scale, 2),
            "replayed_fixed": {n: round(r[i].tokens_per_second, 2) for n, r in fixed.items()},
            "choices": {f"{d}:{k}": c for (d, k), c in replay.choices.most_common()},
        }
        if i < len(measured_by_iteration):
            here = measured_by_iteration[i]
            row["over_off"] = ratio_of(replay.tokens_per_second * scale, here.get("off"))
        per_iteration.append(row)
    doc: dict[str, Any] = {
        "tokens_per_second": round(oracle_tps * scale, 2),
        "replayed_tokens_per_second": round(oracle_tps, 2),
        "scale": round(scale, 3),
        "measured_over_replayed": agreement,
        "replayed": {n: round(v, 2) for n, v in replayed.items()},
        "choices": choice_counts(oracle),
        "iterations": per_iteration,
        "best_fixed": best_fixed,
        "fixed_won": fixed_won,
    }
    if best_fixed is not None:
        ratio = oracle_tps * scale / measured[best_fixed]
        doc["over_best_fixed"] = round(ratio, 3)
        doc["at_or_above_fixed"] = ratio >= 1 - NOISE
    return doc


def add_oracle(
    shadows: Sequence[IterationTraces],
    runs: Iterable[tuple[str, Sequence[StepRecord]]],
    model: CostModel,
    strategies: Sequence[Strategy],
    medians: dict[str, float],
    cpu: dict[str, float],
    by_iteration: Sequence[dict[str, float]],
    ours: Callable[[StepCost], Mapping[str, Any]] | None = None,
    expectation: Callable[[StepCost, Mapping[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The oracle's report, with ``oracle`` added to the medians (wall, CPU by the fixed
    configurations' median CPU/wall ratio, and per iteration) in measured tokens/s.

    ``ours``: replays the selector over the same traces and step costs
    (``selector_replay.replay_rounds``); its result is reported beside the oracle's and the
    fixed configurations' replays (``ours_replayed``), free of timing noise. ``expectation``:
    the expectation oracle's report on the same step costs, given this one
    (``expectation_oracle.expectation_report``)."""
    cost = priced_cost(runs, model)
    report = oracle_report(shadows, cost, strategies, medians, by_iteration)
    report["cost_fit"] = cost_fit(cost)
    if ours is not None:
        report["ours_replayed"] = ours_versus_replays(ours(cost), report)
    if expectation is not None:
        report["expectation"] = expectation(cost, report)
    medians["oracle"] = report["tokens_per_second"]
    for m, row in zip(by_iteration, report["iterations"], strict=True):
        m["oracle"] = row["tokens_per_second"]
    cpu_over_wall = [cpu[n] / medians[n] for n in medians if n.startswith("fixed:") and n in cpu]
    if cpu_over_wall:
        cpu["oracle"] = medians["oracle"] * statistics.median(cpu_over_wall)
    return report


def ours_versus_replays(ours: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """Ours replayed, against the oracle, plain decoding and the best fixed configuration
    replayed on the same batches and step costs (overall and per iteration)."""
    replayed = report["replayed"]
    fixed = {n: v for n, v in replayed.items() if n.startswith("fixed:")}
    best = max(fixed, key=lambda n: fixed[n], default=None)
    tps = float(ours["tokens_per_second"])
    out: dict[str, Any] = {
        **ours,
        "tokens_per_second_scaled": round(tps * report["scale"], 2),
        "over_oracle": ratio_of(tps, report["replayed_tokens_per_second"]),
        "over_off": ratio_of(tps, replayed.get("k0")),
        "best_fixed": best,
        "over_best_fixed": ratio_of(tps, fixed.get(best) if best else None),
    }
    rows = []
    for row, value in zip(report["iterations"], ours["iterations"], strict=False):
        again = row["replayed_fixed"]
        here = {n: v for n, v in again.items() if n.startswith("fixed:")}
        best_here = max(here, key=lambda n: here[n], default=None)
        rows.append(
            {
                "iteration": row["iteration"],
                "tokens_per_second": value,
                "over_oracle": ratio_of(value, row["replayed_tokens_per_second"]),
                "over_off": ratio_of(value, again.get("k0")),
                "over_best_fixed": ratio_of(value, here.get(best_here) if best_here else None),
            }
        )
    out["iterations"] = rows
    return out


FIT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Batch sizes at which measured and modelled step costs are compared (where measured)."""


def cost_fit(cost: MeasuredCost, min_steps: int = 3) -> dict[str, dict[int, list[float]]]:
    """Measured vs modelled (the calibrated cost model, the selector's) milliseconds of one
    step, per strategy, at the batch sizes of ``FIT_BATCHES`` measured at least ``min_steps``
    times: whether the selector's cost model fits this machine."""
    out: dict[str, dict[int, list[float]]] = {}
    for (drafter, k), curve in sorted(cost.curves.items()):
        counts = cost.counts[(drafter, k)]
        row = {
            batch: [round(1000 * seconds, 2), round(1000 * cost.fallback(drafter, batch, k), 2)]
            for batch, seconds in curve
            if batch in FIT_BATCHES and counts[batch] >= min_steps
        }
        if row:
            out[f"{drafter}:{k}"] = row
    return out


def choice_counts(replays: Sequence[Replay]) -> dict[str, int]:
    """How often each strategy was chosen over the replays, most chosen first."""
    total: dict[str, int] = {}
    for r in replays:
        for (d, k), n in r.choices.items():
            total[f"{d}:{k}"] = total.get(f"{d}:{k}", 0) + n
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def ratio_of(a: float, b: float | None) -> float | None:
    """a / b to 3 places (None when b is missing or zero)."""
    return round(a / b, 3) if b else None


def summary(doc: Mapping[str, Any]) -> list[str]:
    """The oracle's lines of the benchmark's printout."""
    lines = [
        f"true hindsight oracle: {doc['tokens_per_second']:.1f} tok/s (replayed "
        f"{doc['replayed_tokens_per_second']:.1f} x {doc['scale']:.3f}, the median measured/"
        "replayed ratio of the fixed configurations)",
        "  replay check, measured/replayed: "
        + ", ".join(f"{n} {v:.2f}" for n, v in sorted(doc["measured_over_replayed"].items())),
        "  oracle's steps: " + ", ".join(f"{s} {n}" for s, n in list(doc["choices"].items())[:6]),
    ]
    if "over_best_fixed" in doc:
        verdict = (
            "at or above it within noise"
            if doc["at_or_above_fixed"]
            else f"BELOW it by more than {NOISE:.0%}: the replay misses something real"
        )
        lines.append(
            f"  oracle vs the best fixed configuration ({doc['best_fixed']}): "
            f"{doc['over_best_fixed']:.3f}x, {verdict}"
        )
    ours = doc.get("ours_replayed")
    if ours:
        lines.append(
            f"  ours replayed on the same batches and step costs: {ours['tokens_per_second']:.1f}"
            f" tok/s = {ours['over_oracle']}x the oracle, {ours['over_best_fixed']}x the best "
            f"fixed ({ours['best_fixed']}), {ours['over_off']}x off (replayed; no timing noise)"
        )
        for row in ours["iterations"]:
            lines.append(
                f"    iteration {row['iteration']}: {row['over_oracle']}x oracle, "
                f"{row['over_best_fixed']}x best fixed, {row['over_off']}x off"
            )
        top = ", ".join(f"{s} {n}" for s, n in list(ours["choices"].items())[:6])
        lines.append(f"    its steps: {top}")
    fit = doc.get("cost_fit", {})
    if fit:
        lines.append("  step ms measured/modelled (the selector's cost model):")
        for strategy, row in fit.items():
            cells = ", ".join(f"B={b} {m:.1f}/{p:.1f}" for b, (m, p) in row.items())
            lines.append(f"    {strategy:<16} {cells}")
    for row in doc["iterations"]:
        if row.get("over_off") is not None:
            lines.append(
                f"  iteration {row['iteration']}: oracle {row['tokens_per_second']:.1f} tok/s, "
                f"{row['over_off']:.3f}x off (the ceiling of any per-step selector here)"
            )
    return lines
