"""Simulated reallocation benchmark: static partition vs threshold migration vs our planner.

Where it sits: issue 4's benchmark at scales this machine cannot host (2-64 generation
workers). ``python -m rlhfspec_workers.benchmarks.reallocation_sim`` (or :func:`main`) replays
the three policies in ``reallocation.simulator`` on one batch per fleet size and prints
makespan ratios against the static partition, with migration counts and overhead; it writes
``reallocation_sim.json`` and ``reallocation_sim.png`` (per-worker batch size over time).

What plugs in from a real run (``bench/reallocation.py`` runs 2 real workers): the measured
step table (``LoadReport.step_profile`` rows [batch, seconds per step, tokens per sequence per
step], ``--step-table``) or a calibrated ``CostModel`` JSON (``--cost-model``, with the
drafter's acceptance), and the run's response lengths (``--lengths``, rollout JSONL). With
those and the real run's partition, :func:`simulate_policies` predicts what the real run
measured, which is how the simulator is checked against it.

Default workload when nothing is given: synthetic heavy-tailed, group-correlated lengths
(``synthetic_samples``) on a GPU-like cost model (:func:`gpu_like_cost_model`); the skewed
assignment puts the longest samples on worker 0 (the issue's "one worker holding the long
tail"). Lower references in the table: ``lpt`` is a static partition that knows every length
(longest first to the least-loaded worker), ``bound`` the longest sample decoded alone.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfspec_workers.reallocation import (
    LengthPredictor,
    MigrationCost,
    PlannerConfig,
    ThroughputModel,
    speculative_speed,
)
from rlhfspec_workers.reallocation.simulator import SimConfig, SimResult, simulate
from rlhfspec_workers.reallocation.workload import (
    Assignment,
    SimSample,
    partition_samples,
    synthetic_samples,
)
from rlhfspec_workers.spec_decode import (
    CostModel,
    CostSample,
    Roofline,
    drafter_from_roofline,
)

from .reallocation_grid import add_grid_arguments, on_grid, side_by_side

DEFAULT_WORKERS = (2, 8, 16, 32, 64)
POLICIES = ("static", "threshold", "planner")
TARGET_RATIO = 0.75
TARGET_OVERHEAD = 0.02


def gpu_like_cost_model(max_batch: int = 256, max_k: int = 8) -> CostModel:
    """A 7B-class target on one H100-class card, as a roofline with a KV-read term:
    t(B, T) = 1 ms + max(4.7 ms weights + 43 us x B KV reads, 23 us x B x T compute).

    Why these numbers: 14 GB of bf16 weights at ~3 TB/s is ~4.7 ms a step; a sequence with
    ~1k tokens of GQA KV cache (128 KB/token) adds ~43 us of reads; ~14 GFLOP per token at
    ~600 TFLOP/s is ~23 us. Decode is memory-bound until B x T ~ 200 + 2B, so large batches
    are slow per sequence and speculation pays at small B, the regime the paper targets.
    Drafter: a ~0.5B draft model (0.4 ms floor, 2 us per token). Assumptions, not measurements.
    """
    grid = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, max_batch}
    batches = sorted(b for b in grid if b <= max_batch)
    samples = [
        CostSample(b, t, 0.001 + max(0.0047 + 43e-6 * b, 23e-6 * b * t))
        for b in batches
        for t in range(1, max_k + 2)
    ]
    draft = drafter_from_roofline("draft", Roofline(0.0004, 2e-6, 0.0002), batches)
    return CostModel.fit(samples, [draft])


def speed_from(
    cost_model: CostModel | ThroughputModel,
    *,
    max_batch: int,
    acceptance: float = 0.8,
    drafter: str | None = None,
    max_k: int = 8,
) -> ThroughputModel:
    """A ThroughputModel as given, or built from a cost model and one drafter's acceptance
    (the selector's best k at every batch size); no drafter in the model: plain decoding."""
    if isinstance(cost_model, ThroughputModel):
        return cost_model
    name = drafter or (cost_model.drafters[0] if cost_model.drafters else None)
    if name is None:
        return ThroughputModel.plain(cost_model, max_batch=max_batch)
    return speculative_speed(
        cost_model, max_batch=max_batch, drafter=name, acceptance=acceptance, max_k=max_k
    )


def load_lengths_jsonl(path: Path | str) -> list[SimSample]:
    """Response lengths from a rollout JSONL: one object per line with ``token_ids`` (or
    ``response_length`` / ``num_tokens`` / ``length``), optional ``group_id`` (or
    ``prompt_id``), ``sample_id``, ``prompt_token_ids`` (or ``prompt_tokens``); an
    ``experience`` line's ``rollout`` is read the same way."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        row = row.get("rollout", row) if isinstance(row, dict) else row
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i + 1}: not a JSON object")
        if "token_ids" in row:
            length = len(row["token_ids"])
        else:
            key = next((k for k in ("response_length", "num_tokens", "length") if k in row), None)
            if key is None:
                raise ValueError(f"{path}:{i + 1}: no token_ids or length field")
            length = int(row[key])
        prompt = row.get("prompt_tokens", len(row.get("prompt_token_ids", [])))
        group = row.get("group_id", row.get("prompt_id"))
        sid = str(row.get("sample_id", f"r{i}"))
        if length >= 1:
            out.append(SimSample(sid, length, int(prompt), None if group is None else str(group)))
    if not out:
        raise ValueError(f"{path}: no samples with a length")
    return out


def resample(samples: Sequence[SimSample], n: int, *, seed: int, tag: str) -> list[SimSample]:
    """n samples drawn with replacement from real ones, whole prompt groups at a time (their
    lengths are correlated), with fresh ids; the pool itself when it has exactly n."""
    if len(samples) == n:
        return list(samples)
    rng = random.Random(seed)
    groups: dict[str, list[SimSample]] = {}
    for s in samples:
        groups.setdefault(s.group_id or s.sample_id, []).append(s)
    pool = list(groups.values())
    out: list[SimSample] = []
    draw = 0
    while len(out) < n:
        members = rng.choice(pool)
        gid = f"{tag}g{draw}"
        for j, s in enumerate(members[: n - len(out)]):
            out.append(SimSample(f"{gid}-s{j}", s.length, s.prompt_tokens, gid))
        draw += 1
    return out


def _batch(
    lengths: Sequence[SimSample] | None,
    n: int,
    group_size: int,
    max_tokens: int,
    seed: int,
    tag: str,
) -> list[SimSample]:
    if lengths is None:
        groups = -(-n // group_size)
        return synthetic_samples(groups, group_size, seed=seed, max_tokens=max_tokens)[:n]
    return resample(lengths, n, seed=seed, tag=tag)


def _predictor(seen: Sequence[SimSample], max_tokens: int, grouped: bool) -> LengthPredictor:
    """A fresh predictor that has seen these lengths (by prompt group only when the groups are
    the batch's own: an independent draw's group ids name other prompts)."""
    if not grouped:
        return LengthPredictor([s.length for s in seen], max_tokens=max_tokens)
    predictor = LengthPredictor(max_tokens=max_tokens)
    for s in seen:
        predictor.observe(s.length, s.group_id)
    return predictor


def simulate_policies(
    workers: Sequence[int],
    lengths: Sequence[SimSample] | None,
    cost_model: CostModel | ThroughputModel,
    *,
    samples_per_worker: int = 256,
    group_size: int = 8,
    assignment: Assignment = "skewed",
    migration_cost: MigrationCost | None = None,
    planner: PlannerConfig | None = None,
    threshold: int | None = None,
    acceptance: float = 0.8,
    max_k: int = 8,
    max_tokens: int = 4096,
    seed: int = 0,
    trace_workers: int | None = 8,
    partitions: dict[int, list[list[SimSample]]] | None = None,
    history: Sequence[SimSample] | None = None,
) -> dict[str, Any]:
    """Replay static / threshold / planner for each fleet size; returns rows, targets and the
    batch traces of one fleet size (`trace_workers`, or the first one).

    `lengths`: real samples (resampled by prompt group to the batch size: workers x
    samples_per_worker) or None for the synthetic distribution. The predictor learns from an
    independent draw of the same distribution (an earlier iteration) plus what finishes.
    `partitions`: fleet size -> an explicit initial assignment (e.g. the real run's), which
    replaces `assignment` for that size. `history`: finished samples the predictor has seen
    before the stage, with their prompt groups (what a real run's coordinator learnt from
    earlier iterations of the same prompts); None: an independent draw of the batch's
    distribution, without groups.
    """
    cost = migration_cost or MigrationCost()
    rows: list[dict[str, Any]] = []
    traces: dict[str, Any] = {}
    trace_at = trace_workers if trace_workers in workers else workers[0]
    for w in workers:
        parts = (partitions or {}).get(w)
        if parts is None:
            batch = _batch(lengths, w * samples_per_worker, group_size, max_tokens, seed, "b")
            parts = partition_samples(batch, w, assignment)
        batch = [s for p in parts for s in p]
        seen = history or _batch(lengths, len(batch), group_size, max_tokens, seed + 7919, "h")
        grouped = history is not None
        capacity = max(len(p) for p in parts)
        speed = speed_from(cost_model, max_batch=capacity, acceptance=acceptance, max_k=max_k)
        results: dict[str, SimResult] = {}
        for policy in POLICIES:
            config = SimConfig(
                policy=policy,  # type: ignore[arg-type]
                capacity=capacity,
                threshold=threshold or max(capacity // 8, 2),
                migration_cost=cost,
                planner=planner or PlannerConfig(),
                max_tokens=max_tokens,
            )
            predictor = _predictor(seen, max_tokens, grouped)
            results[policy] = simulate(parts, speed, config, predictor=predictor)
        lpt = simulate(partition_samples(batch, w, "lpt"), speed, SimConfig(policy="static"))
        static = results["static"].makespan_seconds
        longest = max(s.length for s in batch)
        ours = results["planner"]
        rows.append(
            {
                "workers": w,
                "samples": len(batch),
                "static_seconds": round(static, 4),
                "threshold_ratio": round(results["threshold"].makespan_seconds / static, 4),
                "ours_ratio": round(ours.makespan_seconds / static, 4),
                "lpt_ratio": round(lpt.makespan_seconds / static, 4),
                "bound_ratio": round(longest * speed.seconds_per_token(1) / static, 4),
                "migrations": ours.migrations,
                "overhead_fraction": round(ours.overhead_fraction, 5),
                "max_worker_overhead_fraction": round(ours.max_worker_overhead_fraction, 5),
                "migration_delay_seconds": round(ours.migration_delay_seconds, 3),
                "threshold_migrations": results["threshold"].migrations,
                "threshold_overhead_fraction": round(results["threshold"].overhead_fraction, 5),
                "idle_worker_seconds": {
                    p: round(r.idle_worker_seconds, 2) for p, r in results.items()
                },
                "plan_calls": ours.plan_calls,
                "plan_wall_seconds": round(ours.plan_wall_seconds, 3),
            }
        )
        if w == trace_at:
            traces = {
                "workers": w,
                "policies": {p: r.batch_trace for p, r in results.items()},
            }
    targets = [
        {
            "workers": r["workers"],
            "makespan_ok": r["ours_ratio"] <= TARGET_RATIO,
            "overhead_ok": r["overhead_fraction"] < TARGET_OVERHEAD,
        }
        for r in rows
    ]
    return {
        "config": {
            "workers": list(workers),
            "samples_per_worker": samples_per_worker,
            "assignment": assignment if not partitions else "given",
            "lengths": "synthetic" if lengths is None else f"{len(lengths)} given samples",
            "acceptance": acceptance,
            "max_k": max_k,
            "max_tokens": max_tokens,
            "seed": seed,
            "migration_cost": vars(cost),
            "planner": vars(planner or PlannerConfig()),
        },
        "rows": rows,
        "targets": targets,
        "trace": traces,
    }


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'workers':>7} {'samples':>7} {'static s':>9} {'thresh/st':>9} {'ours/st':>8} "
        f"{'lpt/st':>7} {'bound/st':>8} {'migr':>6} {'ovh %':>6} {'target':>7}"
    )
    lines = [head, "-" * len(head)]
    for r, t in zip(result["rows"], result["targets"], strict=True):
        ok = "ok" if t["makespan_ok"] and t["overhead_ok"] else "miss"
        lines.append(
            f"{r['workers']:>7} {r['samples']:>7} {r['static_seconds']:>9.2f} "
            f"{r['threshold_ratio']:>9.3f} {r['ours_ratio']:>8.3f} {r['lpt_ratio']:>7.3f} "
            f"{r['bound_ratio']:>8.3f} {r['migrations']:>6} "
            f"{100 * r['overhead_fraction']:>6.2f} {ok:>7}"
        )
    lines.append(
        f"targets: ours/static <= {TARGET_RATIO}, migration engine time < "
        f"{100 * TARGET_OVERHEAD:.0f}% of worker-time (lpt: static partition knowing every "
        "length; bound: the longest sample decoded alone)"
    )
    return "\n".join(lines)


def write_png(result: dict[str, Any], path: Path) -> Path:
    """Per-worker running batch over time, one panel per policy, for the traced fleet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = result["trace"]
    policies = list(trace["policies"])
    fig, axes = plt.subplots(len(policies), 1, figsize=(9, 2.6 * len(policies)), sharex=True)
    for ax, policy in zip(axes, policies, strict=True):
        per_worker: dict[int, list[tuple[float, int]]] = {}
        for t, w, b in trace["policies"][policy]:
            per_worker.setdefault(int(w), []).append((float(t), int(b)))
        for w, points in sorted(per_worker.items()):
            ax.step([t for t, _ in points], [b for _, b in points], where="post", lw=0.8)
            del w
        ax.set_ylabel("running batch")
        ax.set_title(f"{policy} ({trace['workers']} workers)", fontsize=9)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reallocation_sim",
        description="Simulate static partition vs threshold migration vs our planner.",
    )
    p.add_argument("--workers", default=",".join(map(str, DEFAULT_WORKERS)))
    p.add_argument("--samples-per-worker", type=int, default=256)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--assignment", default="skewed", choices=["skewed", "grouped", "round_robin"])
    p.add_argument("--lengths", type=Path, help="rollout JSONL with response token counts")
    p.add_argument("--step-table", type=Path, help="JSON rows [batch, step s, tokens/seq/step]")
    p.add_argument("--prefill-per-token", type=float, help="seconds (with --step-table)")
    p.add_argument("--cost-model", type=Path, help="CostModel JSON (calibration)")
    p.add_argument("--acceptance", type=float, default=0.8)
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument(
        "--from-run",
        type=Path,
        help="a JSON `rlhfspec bench reallocation` wrote (e.g. bench/data/reallocation-2workers-"
        "*.json): its workers' measured step table, prefill rate and KV cost (replaces "
        "--step-table, --prefill-per-token and the --kv options)",
    )
    p.add_argument("--kv-bytes-per-token", type=float, default=0.0)
    p.add_argument("--kv-bandwidth", type=float, default=0.0, help="bytes/s; 0: no KV path")
    p.add_argument("--cost-weight", type=float)
    p.add_argument("--min-gain-fraction", type=float)
    p.add_argument("--overhead-budget", type=float)
    p.add_argument("--trace-workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 and 8 workers, 64 samples each")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    add_grid_arguments(p)
    return p


def measured_run(path: Path) -> tuple[ThroughputModel, MigrationCost]:
    """The speed and move cost real workers measured, from a reallocation benchmark's JSON."""
    inputs = json.loads(path.read_text()).get("simulator_inputs")
    if not inputs or not inputs.get("prefill_seconds_per_token"):
        raise SystemExit(f"{path}: no simulator_inputs with a measured prefill rate")
    model = ThroughputModel.from_table(
        [(int(b), float(s), float(t)) for b, s, t in inputs["step_table"]],
        prefill_seconds_per_token=float(inputs["prefill_seconds_per_token"]),
    )
    return model, MigrationCost(**inputs["migration_cost"])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workers = [int(x) for x in str(args.workers).split(",") if x]
    per_worker = args.samples_per_worker
    if args.quick:
        workers, per_worker = [2, 8], 64
    model: CostModel | ThroughputModel
    cost = MigrationCost(
        kv_bytes_per_token=args.kv_bytes_per_token, kv_bandwidth_bytes_per_second=args.kv_bandwidth
    )
    if args.from_run is not None:
        model, cost = measured_run(args.from_run)
    elif args.step_table is not None:
        rows = json.loads(args.step_table.read_text())
        if args.prefill_per_token is None:
            raise SystemExit("--step-table needs --prefill-per-token")
        model = ThroughputModel.from_table(
            [(int(b), float(s), float(t)) for b, s, t in rows],
            prefill_seconds_per_token=args.prefill_per_token,
        )
    elif args.cost_model is not None:
        model = CostModel.from_json(args.cost_model.read_text())
    else:
        model = gpu_like_cost_model(max_batch=max(per_worker, 1), max_k=args.max_k)
    overrides = {
        k: v
        for k, v in (
            ("cost_weight", args.cost_weight),
            ("min_gain_fraction", args.min_gain_fraction),
            ("overhead_budget", args.overhead_budget),
        )
        if v is not None
    }
    lengths = load_lengths_jsonl(args.lengths) if args.lengths else None

    def run(model: CostModel | ThroughputModel, cost: MigrationCost) -> dict[str, Any]:
        return simulate_policies(
            workers,
            lengths,
            model,
            samples_per_worker=per_worker,
            group_size=args.group_size,
            assignment=args.assignment,
            migration_cost=cost,
            planner=PlannerConfig(**overrides),
            acceptance=args.acceptance,
            max_k=args.max_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
            trace_workers=args.trace_workers,
        )

    result = run(model, cost)
    print(format_table(result))
    if args.cost_grid is not None:
        try:
            grid = on_grid(args, cost, run)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        result["on_grid"] = grid
        label = f"{grid['model']} on {grid['device']}"
        print(
            f"\n{label} ({grid['kv_bytes_per_token']:.0f} KV bytes a token; chosen at B = "
            + ", ".join(f"{b}: {s}" for b, s in grid["strategies"].items())
            + "):"
        )
        print(format_table(grid["result"]))
        print(f"\nthis machine's costs beside {label}:")
        print(side_by_side(result, grid["result"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reallocation_sim.json").write_text(json.dumps(result, indent=1))
    png = write_png(result, args.out / "reallocation_sim.png")
    print(f"wrote {args.out / 'reallocation_sim.json'} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
