"""The generation benchmark's JSON document, built from a finished run.

Where it sits: ``benchmarks.generation.Bench`` runs the profile pass and the measured rounds,
then ``Bench.to_json`` calls :func:`document`; ``benchmarks.report`` prints and plots the
document, and scripts read it (``configs.<name>.median_tokens_per_second``, ``ratios``,
``oracle``, ``iterations``, ``traces``).

What it adds to the measured runs: per configuration the median over rounds of tokens per
wall and CPU second (overall and per iteration), the ratios against ours (of the medians, and
round by round with quartiles), the run's own noise floor (the spread of the configurations
that did identical work), and, when the
bench kept shadow runs, the true hindsight oracle, ours and every fixed configuration
replayed on the same batches (``hindsight_oracle.add_oracle``), the expectation oracle
(``expectation_oracle``) and the projections onto another machine's cost grid
(``projection``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rlhfspec_workers.spec_decode.hindsight import StepCost

from .hindsight_oracle import add_oracle
from .oracle_curse import winners_curse
from .projection import projections
from .selector_replay import ours_replayer
from .workload import RunResult

if TYPE_CHECKING:
    from .generation import Bench


def per_round(
    results: Sequence[RunResult], *, cpu: bool = False, iteration: int | None = None
) -> dict[str, dict[int, float]]:
    """Per configuration and round, its tokens per second (a round's iterations taken
    together, or only ``iteration``)."""
    cells: dict[tuple[str, int], list[float]] = {}
    for r in results:
        if iteration is not None and r.iteration != iteration:
            continue
        cell = cells.setdefault((r.config, r.round), [0.0, 0.0])
        cell[0] += r.tokens
        cell[1] += r.cpu_seconds if cpu else r.seconds
    by: dict[str, dict[int, float]] = {}
    for (config, round_index), (tokens, seconds) in cells.items():
        by.setdefault(config, {})[round_index] = tokens / seconds if seconds > 0 else 0.0
    return by


def medians(
    results: Sequence[RunResult], *, cpu: bool = False, iteration: int | None = None
) -> dict[str, float]:
    """Per configuration, the median over rounds of its tokens per second (a round's
    iterations taken together, or only ``iteration``)."""
    rounds = per_round(results, cpu=cpu, iteration=iteration)
    return {name: statistics.median(v.values()) for name, v in rounds.items()}


def paired(results: Sequence[RunResult], ours: str = "ours") -> dict[str, list[float]]:
    """Ours over each configuration round by round, as [first quartile, median, third
    quartile] of the per-round ratios. Every configuration of a round samples the same seeded
    batch, so a round's ratio is free of the batch-to-batch spread the medians carry; the
    quartiles show how far single rounds scatter (on a shared 2-core machine, identical work
    timed 0.62-1.23x between rounds)."""
    rounds = per_round(results)
    mine = rounds.get(ours, {})
    out: dict[str, list[float]] = {}
    for name, values in rounds.items():
        ratios = sorted(mine[r] / v for r, v in values.items() if r in mine and v > 0)
        if len(ratios) >= 2:
            q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            out[name] = [round(q1, 3), round(q2, 3), round(q3, 3)]
        elif ratios:
            out[name] = [round(ratios[0], 3)] * 3
    return out


def noise_floor(results: Sequence[RunResult]) -> dict[str, Any] | None:
    """The machine's timing noise, measured inside the run: configurations that did identical
    work (nothing drafted in any run, and in every round and iteration as many tokens as plain
    decoding: common seeds make them sample the same tokens) differ only by noise. None when
    fewer than two did. A ratio between configurations closer to 1 than this spread cannot
    be told from noise on this machine."""
    cells: dict[str, dict[tuple[int, int], RunResult]] = {}
    for r in results:
        cells.setdefault(r.config, {})[(r.round, r.iteration)] = r
    off = cells.get("off")
    if not off:
        return None
    same = sorted(
        name
        for name, runs in cells.items()
        if runs.keys() == off.keys()
        and all(
            run.tokens == off[key].tokens and not any(s.num_draft_tokens for s in run.steps)
            for key, run in runs.items()
        )
    )
    if len(same) < 2:
        return None
    totals = {name: sum(run.seconds for run in cells[name].values()) for name in same}
    spreads = [
        max(cells[n][key].seconds for n in same) / min(cells[n][key].seconds for n in same)
        for key in off
    ]
    return {
        "configs": same,
        "total_seconds": {name: round(t, 3) for name, t in totals.items()},
        "total_spread": round(max(totals.values()) / min(totals.values()), 3),
        "round_spread_median": round(statistics.median(spreads), 3),
        "round_spread_max": round(max(spreads), 3),
    }


def representative(results: Sequence[RunResult], name: str) -> RunResult | None:
    """The run whose throughput is the config's median (for plots)."""
    runs = sorted((r for r in results if r.config == name), key=lambda r: r.tokens_per_second)
    return runs[len(runs) // 2] if runs else None


def _expectation(
    bench: Bench, strategies: list[tuple[str, int]]
) -> Callable[[StepCost, Mapping[str, Any]], dict[str, Any]]:
    """The expectation oracle's report, run once the true oracle's is ready."""
    from .expectation_oracle import DraftProbabilities, expectation_report

    def report(cost: StepCost, oracle: Mapping[str, Any]) -> dict[str, Any]:
        scorer = DraftProbabilities(bench.scorer, bench.settings.temperature)
        return expectation_report(bench.shadows, cost, strategies, scorer, oracle)

    return report


def _replays(
    bench: Bench,
    measured: dict[str, float],
    cpu: dict[str, float],
    by_iteration: Sequence[dict[str, float]],
) -> dict[str, Any]:
    """The oracle's document (and the projections) from the bench's shadow runs. The oracle's
    measured-currency figure joins ``measured``, ``cpu`` and ``by_iteration`` (the
    configurations' table)."""
    s = bench.settings
    runs = [*bench.profile_runs, *((r.config, r.steps) for r in bench.results)]
    strategies = [(d, k) for d in s.drafters for k in s.ks]
    here = bench.cost_model
    options = bench.replay_options.with_drafting(runs, here)
    ours = ours_replayer(lambda: bench.fresh_ours(here), bench.shadows, options, s.repeats)
    expectation = _expectation(bench, strategies) if s.expectation_oracle else None
    oracle = add_oracle(
        bench.shadows, runs, here, strategies, measured, cpu, by_iteration,
        ours, expectation,
    )  # fmt: skip
    oracle["curse"] = winners_curse(bench.shadows, runs, here, strategies)
    out: dict[str, Any] = {"oracle": oracle}
    if s.cost_grid is not None:
        out["projections"] = projections(
            s.cost_grid, bench.shadows, here, strategies, bench.fresh_ours,
            bench.replay_options, s.repeats,
        )  # fmt: skip
    return out


def document(bench: Bench) -> dict[str, Any]:
    """The JSON document of a bench whose measured rounds have run."""
    from .report import ratios, trace

    results = bench.results
    measured, cpu = medians(results), medians(results, cpu=True)
    by_iteration = [medians(results, iteration=i) for i in range(bench.settings.iterations)]
    doc: dict[str, Any] = dict(bench.meta)
    doc["target"] = str(bench.target)
    if bench.shadows:
        doc.update(_replays(bench, measured, cpu, by_iteration))
    doc["configs"] = {
        name: {
            "median_tokens_per_second": round(measured[name], 2),
            "median_tokens_per_cpu_second": round(cpu.get(name, 0.0), 2),
            "iterations": [round(m.get(name, 0.0), 2) for m in by_iteration],
            "runs": [r.summary() for r in results if r.config == name],
        }
        for name in measured
    }
    doc["predictions"] = predictions(doc["configs"])
    doc["ratios"] = ratios(measured)
    doc["ratios"]["paired_ours_over"] = paired(results)
    doc["ratios_cpu"] = ratios(cpu)
    doc["noise_floor"] = noise_floor(results)
    alike = set(doc["noise_floor"]["configs"]) if doc["noise_floor"] else set()
    for table_ in (doc["ratios"], doc["ratios_cpu"]):
        for check in table_["targets"]:
            # Ours and the baseline did the same work: their ratio measures the machine.
            check["identical_work"] = "ours" in alike and check["baseline"] in alike
    doc["iterations"] = [{"iteration": i, "ratios": ratios(m)} for i, m in enumerate(by_iteration)]
    doc["traces"] = {}
    for name in (
        "ours",
        "ours-native",
        "bucket-oracle",
        "bandit",
        "off",
        doc["ratios"]["best_fixed"],
    ):
        run = representative(results, name) if name else None
        if run is not None:
            doc["traces"][name] = trace(run.steps)
    return doc


def predictions(configs: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per configuration whose strategy predicts (ours, ours' variants), its runs' expected
    against accepted draft tokens per ``drafter:k`` (``workload.expected_against_accepted``)
    summed, with ``accepted / expected``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, config in configs.items():
        cells: dict[str, dict[str, float]] = {}
        for run in config["runs"]:
            for key, cell in run.get("expected_accepted", {}).items():
                into = cells.setdefault(key, {"steps": 0.0, "expected": 0.0, "accepted": 0.0})
                for field_ in into:
                    into[field_] += cell[field_]
        for cell in cells.values():
            cell["ratio"] = (
                round(cell["accepted"] / cell["expected"], 3) if cell["expected"] else 0.0
            )
        if cells:
            out[name] = cells
    return out
