"""Projection: this machine's acceptance traces replayed on another machine's step costs.

Where it sits: at the end of ``rlhfspec bench generation --cost-grid FILE``. The benchmark
has the shadow traces of its batches (what every drafter would have got accepted, at every
position of every sample: a property of the policy and the drafters, not of the hardware).
A verification grid t(B, T) measured elsewhere (``bench/gpu_verify_grid.py`` on a GPU)
becomes a cost model (:func:`grid_cost_model`), and the same batches are replayed on it
under plain decoding, every fixed strategy, the true oracle and ours (the selector deciding
with that cost model, as a worker calibrated on that machine would): the predicted ratios
there, printed beside this machine's replayed ones.

Drafting costs on the other machine: a model-free drafter's per-step overhead is CPU work
and kept as measured here. A draft model's forward is priced from the grid where the grid
timed the proposer's own draft forward there (a grid model's ``draft``: the per-position
forward, T = 1, per batch size); otherwise it is assumed to shrink like the target's plain
decode step (its per-token cost here times grid t(B, 1) / this machine's t(B, 1)). Either way
the proposer's per-step overhead is kept as measured here. The grid holds the target's
forward alone: no scheduler, sampler or proposer bookkeeping.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhfspec_workers.generation.draft_strategy import DraftStrategy
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import CostSample, CostTableKey, DrafterCost
from rlhfspec_workers.spec_decode.hindsight import Strategy

from .hindsight_oracle import IterationTraces, oracle_report, ours_versus_replays, ratio_of
from .selector_replay import ReplayOptions, replay_rounds

GRID_SCHEMA = "rlhfspec.bench.verify_grid/v1"
DRAFT_MODEL = "draft_model"
"""The drafter a grid's timed draft forward prices."""


def load_grid(path: Path) -> dict[str, Any]:
    """A ``gpu_verify_grid.py`` result; ValueError naming what is wrong."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--cost-grid {path}: not readable JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("schema") != GRID_SCHEMA:
        raise ValueError(f"--cost-grid {path}: schema must be {GRID_SCHEMA!r}")
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"--cost-grid {path}: no measured models")
    for m in models:
        if not m.get("samples"):
            raise ValueError(f"--cost-grid {path}: model {m.get('name')!r} has no samples")
    return doc


def grid_cost_model(grid: Mapping[str, Any], device: str, here: CostModel) -> CostModel:
    """One model of a grid file as a cost model; drafters priced from the grid's timed draft
    forward where it has one, else from ``here`` (see module docstring)."""
    samples = [CostSample(int(b), int(t), float(s)) for b, t, s, *_ in grid["samples"]]
    key = CostTableKey(str(grid["name"]), device)
    verify_only = CostModel(key, samples)
    timed_draft = draft_forward_seconds(grid)
    drafters = []
    for name in here.drafters:
        cost = here.drafter_cost(name)
        if name == DRAFT_MODEL and timed_draft:
            per_token = timed_draft
        else:
            per_token = tuple(
                (b, s * verify_only.verify_seconds(b, 0) / here.verify_seconds(b, 0))
                for b, s in cost.per_token
            )
        drafters.append(DrafterCost(name, cost.overhead_seconds, per_token))
    return CostModel(key, samples, drafters)


def draft_forward_seconds(grid: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """(B, seconds) of one draft position's forward, from a grid model's timed draft (empty
    when it has none): a draft of k tokens is the catch-up forward (T = 2, about one T = 1
    forward on a GPU, where a forward this small is bound by reading its weights) and k - 1
    one-token forwards."""
    draft = grid.get("draft") or {}
    return tuple(
        sorted((int(b), float(s)) for b, t, s, *_ in draft.get("samples", ()) if int(t) == 1)
    )


def project(
    iterations: Sequence[IterationTraces],
    model: CostModel,
    strategies: Sequence[Strategy],
    fresh_ours: Callable[[CostModel], DraftStrategy],
    options: ReplayOptions,
    rounds: int,
) -> dict[str, Any]:
    """Replayed tokens/s of plain decoding, each fixed strategy, the oracle and ours on
    ``model``'s step costs, with ours' ratios to them (overall and per iteration)."""
    report = oracle_report(iterations, model.step_seconds, strategies, {})
    ours = replay_rounds(iterations, model.step_seconds, fresh_ours(model), options, rounds=rounds)
    return {
        "cost_table": model.key.slug(),
        "oracle": report["replayed_tokens_per_second"],
        "oracle_over_off": ratio_of(report["replayed_tokens_per_second"], report["replayed"]["k0"]),
        "replayed": report["replayed"],
        "oracle_choices": report["choices"],
        "ours": ours_versus_replays(ours, report),
    }


def projections(
    path: Path,
    iterations: Sequence[IterationTraces],
    here: CostModel,
    strategies: Sequence[Strategy],
    fresh_ours: Callable[[CostModel], DraftStrategy],
    options: ReplayOptions,
    rounds: int,
) -> dict[str, Any]:
    """Every model of the grid file at ``path``, projected (see :func:`project`)."""
    doc = load_grid(path)
    device = str(doc.get("device", "unknown"))
    return {
        "grid": str(path),
        "device": device,
        "models": {
            str(m["name"]): {
                **project(
                    iterations,
                    grid_cost_model(m, device, here),
                    strategies,
                    fresh_ours,
                    options,
                    rounds,
                ),
                "draft": (m.get("draft") or {}).get("name") if draft_forward_seconds(m) else None,
            }
            for m in doc["models"]
        },
    }


def summary(doc: Mapping[str, Any], here: Mapping[str, Any] | None) -> list[str]:
    """Printed lines: per projected model, ours against the oracle, the best fixed and off,
    beside this machine's replayed ratios (``here``: the oracle report's ``ours_replayed``)."""
    lines = [f"projected on {doc['device']} (grid {doc['grid']}):"]
    if here:
        lines.append(
            f"  this machine (replayed): ours {here['over_oracle']}x oracle, "
            f"{here['over_best_fixed']}x best fixed, {here['over_off']}x off"
        )
    for name, p in doc["models"].items():
        o = p["ours"]
        lines.append(
            f"  {name}: ours {o['over_oracle']}x oracle, {o['over_best_fixed']}x best fixed "
            f"({o['best_fixed']}), {o['over_off']}x off; oracle {p['oracle_over_off']}x off"
            + (f"; draft model priced by {p['draft']}'s timed forward" if p.get("draft") else "")
        )
    return lines
