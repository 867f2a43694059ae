"""The reallocation simulator on another machine's verification grid (a GPU's, say).

Where it sits: ``reallocation_sim --cost-grid FILE``. ``bench/gpu_verify_grid.py`` times a
target's forward of B rows x T tokens, t(B, T), on the machine it runs on. Here one model of
that file becomes the simulator's worker speed and migration cost, and the same fleets are
simulated twice, on this machine's costs (a measured run, ``--from-run``) and on the grid's,
so the printout puts the predicted ratios side by side.

What carries over from this machine, and why:
- Acceptance: a property of the policy and its drafters, not of the hardware. A drafter's
  per-position acceptance comes from a ``bench generation`` JSON
  (:func:`acceptance_from_generation`); the selector then picks k at every batch size on the
  grid's costs, as a worker calibrated there would.
- A model-free drafter's per-step cost (suffix lookups) is CPU work: ``overhead_seconds``, as
  measured here. A draft model's forward is ``forward_ratio`` times the target's plain step at
  the same batch on the grid (an assumption named on the command line, not a measurement).
- The coordinator's hand-over costs (order round trip, per-sample state) are Redis and CPU
  work and stay as measured here.

What the grid leaves out: a serving engine's own work every step (scheduler, sampler, Python).
On this project's 2-core CPU a bare forward of the reallocation benchmark's target took 17.5
ms at B = 1 and 107 ms at B = 144 where vLLM's steps took 26 and 86 ms: without that fixed
part, step time depends more on B, and moving samples off a full worker looks more
profitable than it is (bench/README.md). ``--grid-step-overhead`` adds it to every cell.

What the grid machine changes: step time t(B, 1..9); prefill (the grid's most prefill-like
cell, ``ThroughputModel.from_cost_model``); a KV transfer's bytes, from the model's shape and
the grid's dtype (2 x layers x KV heads x head size x bytes), over a link of
``--grid-kv-bandwidth`` bytes/s (default: a 200 Gb/s RDMA NIC between nodes, ~25 GB/s; an
assumption). Pure Python on top of ``reallocation`` and ``spec_decode``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rlhfspec_workers.reallocation import MigrationCost, ThroughputModel
from rlhfspec_workers.spec_decode.acceptance import FixedAcceptance
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.cost_records import CostSample, CostTableKey, DrafterCost
from rlhfspec_workers.spec_decode.selector import Candidate

from .projection import load_grid

DEFAULT_KV_BANDWIDTH = 25e9
"""Bytes/s between two generation pods' GPUs on different nodes: a 200 Gb/s RDMA NIC."""

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


@dataclass(frozen=True)
class GridDrafter:
    """A drafter on the grid's machine: acceptance measured here, cost as described above."""

    name: str
    rates: tuple[float, ...]
    """P(position i accepted | position i - 1 accepted), a row without a draft counting as
    rejected at position 0 (:func:`acceptance_from_generation`)."""
    overhead_seconds: float = 0.0
    forward_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not self.rates or any(not 0.0 <= r <= 1.0 for r in self.rates):
            raise ValueError(f"acceptance rates must be within [0, 1]: {self.rates}")
        if self.overhead_seconds < 0.0 or self.forward_ratio < 0.0:
            raise ValueError("draft overhead and forward ratio must be >= 0")


def pick_model(doc: Mapping[str, Any], name: str | None) -> Mapping[str, Any]:
    """The grid's model ``name`` (None: the first); ValueError naming the ones it has."""
    models: dict[str, Mapping[str, Any]] = {str(m["name"]): m for m in doc["models"]}
    if name is None:
        return next(iter(models.values()))
    if name not in models:
        raise ValueError(f"--grid-model {name!r}: the grid has {', '.join(sorted(models))}")
    return models[name]


def kv_bytes_per_token(model: Mapping[str, Any]) -> float:
    """KV cache bytes of one context token of the grid's model (keys and values, every
    layer), in the dtype the grid was timed in."""
    config = model.get("config") or {}
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"grid model {model.get('name')!r}: config needs num_hidden_layers, "
            f"num_attention_heads and hidden_size (missing or bad: {err})"
        ) from None
    dtype = str(model.get("dtype", "bfloat16")).removeprefix("torch.")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"grid model dtype {dtype!r}: one of {', '.join(_DTYPE_BYTES)}")
    return float(2 * layers * kv_heads * head_dim * _DTYPE_BYTES[dtype])


def grid_worker_cost(
    model: Mapping[str, Any],
    device: str,
    drafter: GridDrafter | None = None,
    step_overhead: float = 0.0,
) -> CostModel:
    """The grid's model as the simulator's cost model: t(B, T) as timed, and ``drafter``'s
    cost there (see the module docstring), every cell plus ``step_overhead`` (the serving
    engine's own work a bare forward leaves out). :func:`grid_speed` turns it into the
    simulator's speed model."""
    if step_overhead < 0.0:
        raise ValueError(f"--grid-step-overhead must be >= 0 seconds, got {step_overhead}")
    samples = [
        CostSample(int(b), int(t), float(s) + step_overhead) for b, t, s, *_ in model["samples"]
    ]
    key = CostTableKey(str(model["name"]), device)
    plain = CostModel(key, samples)
    if drafter is None:
        return plain
    per_token: tuple[tuple[int, float], ...] = ()
    if drafter.forward_ratio > 0.0:
        batches = sorted({s.batch_size for s in samples})
        per_token = tuple((b, drafter.forward_ratio * plain.verify_seconds(b, 0)) for b in batches)
    return CostModel(key, samples, [DrafterCost(drafter.name, drafter.overhead_seconds, per_token)])


def grid_prefill_seconds_per_token(model: Mapping[str, Any]) -> float:
    """A prompt token's prefill cost there: the grid's cheapest cell per token (its most
    token-dense forward, B x T in the thousands on the default grid). Prefill is
    compute-bound and so is that cell; the cost model's own prefill probe (B = 32, T = 16)
    lies past a grid that stops at T = 9, and extrapolating to it was ~3x off on this CPU."""
    return min(float(s) / (int(b) * int(t)) for b, t, s, *_ in model["samples"])


def grid_speed(
    model: Mapping[str, Any],
    device: str,
    *,
    max_batch: int,
    drafter: GridDrafter | None = None,
    max_k: int = 8,
    step_overhead: float = 0.0,
) -> ThroughputModel:
    """Worker speed there at every batch size up to ``max_batch`` (beyond, the step time
    keeps its last slope): the selector's best (drafter, k) on the grid's costs with the
    drafter's measured acceptance, or plain decoding without a drafter."""
    cost = grid_worker_cost(model, device, drafter, step_overhead)
    candidates = (
        [] if drafter is None else [Candidate(drafter.name, FixedAcceptance(drafter.rates))]
    )
    return ThroughputModel.from_cost_model(
        cost,
        max_batch=max_batch,
        candidates=candidates,
        max_k=grid_max_k(model, max_k),
        prefill_seconds_per_token=grid_prefill_seconds_per_token(model),
    )


def grid_max_k(model: Mapping[str, Any], max_k: int) -> int:
    """The largest k the grid measured (T - 1), within ``max_k``: beyond it t(B, T) would be
    extrapolated."""
    return max(0, min(max_k, max(int(t) for _, t, *_ in model["samples"]) - 1))


def grid_run_inputs(
    inputs: Mapping[str, Any], model: Mapping[str, Any], device: str, step_overhead: float = 0.0
) -> dict[str, Any]:
    """A real run's simulator inputs (``bench reallocation``'s JSON, ``simulator_inputs``)
    with the worker speed, prefill rate and KV bytes the grid gives; the partition, the
    hand-over costs, the link and the planner settings as the run measured them. Fed to
    ``reallocation_replay.simulator_check``, it checks the grid path against a real run when
    the grid was timed on the run's machine, for the run's target."""
    measured = ThroughputModel.from_table(
        [(int(b), float(s), float(t)) for b, s, t in inputs["step_table"]],
        prefill_seconds_per_token=inputs.get("prefill_seconds_per_token") or None,
    )
    top = max(len(part) for part in inputs["partition"])
    speed = grid_speed(model, device, max_batch=top, step_overhead=step_overhead)
    out = dict(inputs)
    # Tokens per step stay the run's own (its speculation, if any, measured there).
    out["step_table"] = [[b, speed.step(b), measured.tokens(b)] for b in range(1, top + 1)]
    out["prefill_seconds_per_token"] = speed.prefill_seconds_per_token
    out["migration_cost"] = {
        **inputs["migration_cost"],
        "kv_bytes_per_token": kv_bytes_per_token(model),
    }
    return out


def grid_migration_cost(
    model: Mapping[str, Any], here: MigrationCost, bandwidth: float = DEFAULT_KV_BANDWIDTH
) -> MigrationCost:
    """``here``'s hand-over costs with the grid model's KV bytes over ``bandwidth``; recompute
    priced at the grid's own prefill rate (the destination's speed model)."""
    if bandwidth < 0.0:
        raise ValueError(f"--grid-kv-bandwidth must be >= 0 bytes/s, got {bandwidth}")
    return replace(
        here,
        kv_bytes_per_token=kv_bytes_per_token(model),
        kv_bandwidth_bytes_per_second=bandwidth,
        prefill_seconds_per_token=None,
    )


def acceptance_from_generation(doc: Mapping[str, Any], drafter: str) -> tuple[float, ...]:
    """Per-position acceptance of ``drafter`` from a ``bench generation`` JSON: its fixed
    runs with the largest k, every round pooled. Rate 0 is accepted first tokens over the rows
    that verified a step of it (a row without a draft is a rejection, as the selector's
    estimator counts it); rate i is accepted at i over accepted at i - 1."""
    configs = doc.get("configs") or {}
    fixed = [
        (int(name.rsplit(":", 1)[1]), runs)
        for name, runs in ((n, c.get("runs") or []) for n, c in configs.items())
        if name.startswith(f"fixed:{drafter}:")
    ]
    if not fixed:
        have = sorted({n.split(":")[1] for n in configs if n.startswith("fixed:")})
        raise ValueError(f"--acceptance-drafter {drafter!r}: the JSON has fixed runs of {have}")
    k, runs = max(fixed, key=lambda kr: kr[0])
    rows = sum(int(r.get("verified_rows", 0)) for r in runs)
    accepted = [0] * k
    for run in runs:
        for i, n in enumerate(run.get("accepted_per_pos") or []):
            if i < k:
                accepted[i] += int(n)
    if rows <= 0:
        raise ValueError(
            f"fixed:{drafter}:{k} has no per-position counts (a JSON from before they were "
            "recorded, or runs that verified nothing)"
        )
    rates = [min(1.0, accepted[0] / rows)]
    for i in range(1, k):
        rates.append(min(1.0, accepted[i] / accepted[i - 1]) if accepted[i - 1] else 0.0)
    return tuple(round(r, 4) for r in rates)


def side_by_side(here: Mapping[str, Any], there: Mapping[str, Any]) -> str:
    """One line per fleet size: ours and the threshold policy over static, the bound, ours'
    migrations and engine-time overhead, each on this machine's costs and on the grid's."""
    columns = (
        ("ours/static", "ours_ratio", "{:.3f}"),
        ("threshold/static", "threshold_ratio", "{:.3f}"),
        ("bound/static", "bound_ratio", "{:.3f}"),
        ("migrations", "migrations", "{}"),
        ("overhead %", "overhead_fraction", "{:.2%}"),
    )
    width = 16
    head = f"{'workers':>7} | " + " | ".join(f"{title:^{width}}" for title, _, _ in columns)
    sub = f"{'':>7} | " + " | ".join(f"{'here':>7} {'there':>8}" for _ in columns)
    lines = [head, sub, "-" * len(head)]
    for a, b in zip(here["rows"], there["rows"], strict=True):
        cells = [
            f"{fmt.format(a[key]).rstrip('%'):>7} {fmt.format(b[key]).rstrip('%'):>8}"
            for _, key, fmt in columns
        ]
        lines.append(f"{a['workers']:>7} | " + " | ".join(cells))
    return "\n".join(lines)


def parse_rates(text: str) -> tuple[float, ...]:
    """``--acceptance-rates 0.7,0.5,0.4``; ValueError naming the flag."""
    bad = f"--acceptance-rates {text!r}: comma-separated numbers in [0, 1]"
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(bad) from None
    if not rates or any(not 0.0 <= r <= 1.0 for r in rates):
        raise ValueError(bad)
    return rates


def strategies_at(speed: ThroughputModel, batches: Sequence[int]) -> dict[int, str]:
    """The (drafter, k) the speed model chose at some batch sizes, for the printout."""
    out: dict[int, str] = {}
    for b in batches:
        if speed.strategies and 1 <= b <= len(speed.strategies):
            d, k = speed.strategies[b - 1]
            out[b] = "off" if k == 0 else f"{d}:{k}"
    return out


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """``reallocation_sim``'s options for a second simulation on a verification grid."""
    g = parser.add_argument_group("on another machine's verification grid")
    g.add_argument("--cost-grid", type=Path, help="what bench/gpu_verify_grid.py wrote")
    g.add_argument("--grid-model", help="the grid's model to use (default: its first)")
    g.add_argument(
        "--grid-kv-bandwidth",
        type=float,
        default=DEFAULT_KV_BANDWIDTH,
        help="bytes/s of a KV transfer between workers there (0: recompute only)",
    )
    g.add_argument(
        "--grid-step-overhead",
        type=float,
        default=0.0,
        help="seconds the serving engine adds to every step beyond the grid's bare forward",
    )
    g.add_argument("--acceptance-from", type=Path, help="a `bench generation` JSON")
    g.add_argument("--acceptance-drafter", default="draft_model", help="its drafter to read")
    g.add_argument("--acceptance-rates", help="per-position rates, e.g. 0.7,0.5 (instead)")
    g.add_argument(
        "--draft-overhead", type=float, default=0.001, help="seconds per drafting step (CPU work)"
    )
    g.add_argument(
        "--draft-forward-ratio",
        type=float,
        default=0.0,
        help="a draft forward as a fraction of the target's plain step (0: model-free)",
    )


def drafter_from_args(args: argparse.Namespace) -> GridDrafter | None:
    """The drafter the grid simulation speculates with; None: plain decoding."""
    name = args.acceptance_drafter
    if args.acceptance_rates:
        rates = parse_rates(args.acceptance_rates)
    elif args.acceptance_from is not None:
        try:
            doc = json.loads(Path(args.acceptance_from).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--acceptance-from {args.acceptance_from}: {err}") from None
        rates = acceptance_from_generation(doc, name)
    else:
        return None
    return GridDrafter(name, rates, args.draft_overhead, args.draft_forward_ratio)


def on_grid(
    args: argparse.Namespace,
    here_cost: MigrationCost,
    simulate: Callable[[ThroughputModel, MigrationCost], dict[str, Any]],
) -> dict[str, Any]:
    """The same fleets simulated on ``args.cost_grid``'s model (``simulate`` runs
    ``simulate_policies`` with everything else as for this machine)."""
    doc = load_grid(args.cost_grid)
    model = pick_model(doc, args.grid_model)
    device = str(doc.get("device", "unknown"))
    drafter = drafter_from_args(args)
    # Beyond max_batch the speed model extrapolates; a skewed partition's biggest worker
    # holds up to about twice the mean.
    top = max(2 * int(args.samples_per_worker), max(int(b) for b, *_ in model["samples"]))
    overhead = float(args.grid_step_overhead)
    speed = grid_speed(
        model, device, max_batch=top, drafter=drafter, max_k=args.max_k, step_overhead=overhead
    )
    migration = grid_migration_cost(model, here_cost, args.grid_kv_bandwidth)
    result = simulate(speed, migration)
    return {
        "grid": str(args.cost_grid),
        "device": device,
        "model": str(model["name"]),
        "dtype": str(model.get("dtype")),
        "kv_bytes_per_token": migration.kv_bytes_per_token,
        "kv_bandwidth_bytes_per_second": migration.kv_bandwidth_bytes_per_second,
        "prefill_seconds_per_token": speed.prefill_seconds_per_token,
        "step_overhead_seconds": overhead,
        "drafter": None if drafter is None else vars(drafter),
        "strategies": strategies_at(speed, (1, 4, 16, 64, 256)),
        "result": result,
    }
