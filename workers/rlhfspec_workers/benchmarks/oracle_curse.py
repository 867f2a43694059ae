"""The oracle's winner's curse, measured in every run: how much of its edge is timing noise.

Where it sits: ``benchmarks.generation`` (``generation_document``) and ``rlhfspec bench
selector-batches`` call :func:`winners_curse` beside the true hindsight oracle
(``hindsight_oracle``), on the same shadow traces and fixed runs.

Why: the oracle picks, step by step, the strategy with the most tokens per second under the
measured step costs, and it is charged those same costs. A (strategy, batch size) cell that
its few fixed runs happened to measure fast (a quiet second of a shared machine) is picked
more often and charged its lucky price, so the oracle's edge over the fixed configurations
holds some of the measurements' noise, which no selector could exploit. On a 2-core Xeon
with AMX (24 tiny batches), with one profile run per configuration and half, the oracle
choosing by one half's costs and charged the other's kept 0.79 and 0.87 of its tokens per
second and fell below the best fixed configuration in one half; with four runs per half it
kept 0.95 and 0.96.

So the runs of every fixed configuration are split into two halves (its first runs and its
last), each half's measured costs (``hindsight_oracle.measured_cost``) charge two oracles: one
choosing by the same half's costs, one by the other half's. The ratio of the two is the share
of the oracle's edge that survives costs measured apart from those it is charged; the first
is the oracle as the report computes it, on half the runs. The oracle chooses greedily (with a
lookahead in the tail), not by an exact optimum, so on a small batch the other half's costs
can by chance schedule a little better: a ratio slightly above 1 means no measurable curse.
Pure Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.hindsight import (
    StepCost,
    Strategy,
    replay_fixed,
    replay_oracle,
)

from .hindsight_oracle import (
    IterationTraces,
    priced_cost,
    ratio_of,
    strategy_of,
    tokens_per_second_of,
)

Runs = Sequence[tuple[str, Sequence[StepRecord]]]


def halves(runs: Iterable[tuple[str, Sequence[StepRecord]]]) -> tuple[Runs, Runs] | None:
    """Every fixed configuration's runs (and plain decoding's), in the order they ran, split
    into its first half and the rest; None unless each was run at least twice."""
    by_config: dict[str, list[tuple[str, Sequence[StepRecord]]]] = {}
    for config, steps in runs:
        if strategy_of(config) is not None:
            by_config.setdefault(config, []).append((config, steps))
    if not by_config or any(len(r) < 2 for r in by_config.values()):
        return None
    first: list[tuple[str, Sequence[StepRecord]]] = []
    last: list[tuple[str, Sequence[StepRecord]]] = []
    for config_runs in by_config.values():
        cut = len(config_runs) // 2
        first.extend(config_runs[:cut])
        last.extend(config_runs[cut:])
    return first, last


def _oracle(
    iterations: Sequence[IterationTraces],
    cost: StepCost,
    strategies: Sequence[Strategy],
    choose_cost: StepCost | None = None,
) -> float:
    replays = [
        replay_oracle(it.traces, cost, strategies, it.dynamic(), choose_cost=choose_cost)
        for it in iterations
    ]
    return tokens_per_second_of(replays)


def _best_fixed(
    iterations: Sequence[IterationTraces], cost: StepCost, strategies: Sequence[Strategy]
) -> float:
    return max(
        tokens_per_second_of([replay_fixed(it.traces, cost, s, it.dynamic()) for it in iterations])
        for s in strategies
    )


def winners_curse(
    iterations: Sequence[IterationTraces],
    runs: Iterable[tuple[str, Sequence[StepRecord]]],
    model: CostModel,
    strategies: Sequence[Strategy],
) -> dict[str, Any] | None:
    """Per half of the fixed runs (charging): the oracle choosing by the same half's costs
    and by the other half's, and the best fixed configuration; overall, the share of the
    oracle's tokens per second kept when it chooses by the other half (``kept``). None when
    some configuration ran only once (no halves)."""
    split = halves(runs)
    if split is None:
        return None
    costs = [priced_cost(h, model) for h in split]
    rows: list[dict[str, Any]] = []
    same_total = apart_total = 0.0
    for charged, judged in ((0, 1), (1, 0)):
        same = _oracle(iterations, costs[charged], strategies)
        apart = _oracle(iterations, costs[charged], strategies, choose_cost=costs[judged])
        best = _best_fixed(iterations, costs[charged], strategies)
        same_total, apart_total = same_total + same, apart_total + apart
        rows.append(
            {
                "charged_by": charged,
                "same_half": round(same, 2),
                "other_half": round(apart, 2),
                "kept": ratio_of(apart, same),
                "same_over_best_fixed": ratio_of(same, best),
                "other_over_best_fixed": ratio_of(apart, best),
            }
        )
    return {"halves": rows, "kept": ratio_of(apart_total, same_total)}


def summary(doc: Mapping[str, Any] | None) -> list[str]:
    """The printout's lines (none when no halves could be made)."""
    if not doc:
        return []
    per_half = "; ".join(
        f"half {r['charged_by'] + 1}: {r['kept']}x ({r['same_over_best_fixed']}x -> "
        f"{r['other_over_best_fixed']}x the best fixed)"
        for r in doc["halves"]
    )
    return [
        f"  the oracle's winner's curse: choosing by costs measured apart from those it is "
        f"charged (the other half of the fixed runs), it keeps {doc['kept']}x of its tokens/s "
        f"({per_half})"
    ]
