"""Real sample-reallocation benchmark: generation workers on a skewed batch, three policies.

Where it sits: ``rlhfspec bench reallocation`` / ``bench/reallocation.py``. It starts a real
``redis-server`` and N real generation worker processes (vLLM, the tiny policy), then for each
policy hands every worker the same skewed initial partition (worker 0 holds the long tail),
with lengths fixed by ``ignore_eos`` so each policy faces the same work, and measures the
makespan (all samples done), the migrations, and the seconds migration cost: measured on the
sources (abort, KV export, hand-over) and on the destinations (KV snapshot read and load inside
the vLLM step). Policies: static partition (no migration), an RLHFuse-style threshold
migration, and our planner (``coordinator.reallocate.Reallocator``, the coordinator's own loop)
as a job gets it (``migration: auto``: KV transfer or recompute, whichever its cost model says
is cheaper), and forced to recompute, with and without its per-stage overhead budget.
Policies are interleaved over ``--repeats`` rounds; the printed ratios are of medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_workers.coordinator.reallocate import Reallocator, migration_cost
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.local.supervisor import Supervisor, local_worker_env
from rlhfspec_workers.messages import LoadReport, SampleTask
from rlhfspec_workers.runtime import Bus, WorkerEnv, worker_name

from .reallocation_replay import balanced_partition, print_simulator_check, replay, simulator_check

POLICIES = (
    "none", "balanced", "threshold", "planner", "planner-recompute", "planner-recompute-unbudgeted"
)  # fmt: skip
LABELS = {
    "none": "static",
    "balanced": "balanced",
    "threshold": "threshold",
    "planner": "ours",
    "planner-recompute": "recompute",
    "planner-recompute-unbudgeted": "rec-nobudg",
}
"""``balanced``: no migration, on a partition that splits the long tail evenly from the start:
what a perfect reallocation with free moves could reach on these engines (a bound, not a
policy: no scheduler knows the lengths in advance). ``recompute``: our planner with KV
transfer off (every move re-prefills its context). ``rec-nobudg``: the same without its
per-stage overhead budget (the trade-off: where recompute is dear, as on a compute-bound CPU,
the budget is what keeps moves few)."""


def _job(workers: int, max_tokens: int, policy: str = "tiny://policy") -> dict[str, Any]:
    return {
        "apiVersion": "rlhfspec.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": "bench-realloc"},
        "spec": {
            "algorithm": {"promptsPerIteration": 1, "samplesPerPrompt": 2, "microBatchSize": 1},
            "models": {"policy": {"path": policy}},
            "dataset": {"path": "tiny://dataset/train.jsonl"},
            "generation": {
                "replicas": workers,
                "maxNewTokens": max_tokens,
                "speculative": {"mode": "off"},
                "reallocation": {"intervalSeconds": 0.2, "minGainSeconds": 0.02},
            },
            "storage": {"size": "1Gi"},
        },
    }


def skewed_partition(
    workers: int, long: int, short: int, long_tokens: int, seed: int
) -> list[list[tuple[str, int]]]:
    """(prompt, max_tokens) per worker: worker 0 holds every long sample plus its share of the
    short ones (the static partition a round-robin over prompts gives when one prompt family
    runs long)."""
    rng = random.Random(seed)
    prompts = ["S" + "".join(rng.choice("0123456789") for _ in range(12)) + "=" for _ in range(8)]
    parts: list[list[tuple[str, int]]] = [[] for _ in range(workers)]
    # Lengths follow the prompt (as in RL: some problems make long answers): four prompts long,
    # four short.
    for i in range(long):
        parts[0].append((prompts[i % 4], long_tokens - rng.randrange(0, long_tokens // 8)))
    for i in range(short):
        parts[i % workers].append((prompts[4 + i % 4], rng.randrange(4, 12)))
    return parts


PROFILE: dict[int, list[tuple[float, float]]] = {}
"""Batch size -> measured (seconds per step, tokens per sequence per step) over all runs."""
PREFILL: list[float] = []
"""The workers' measured prefill seconds per prompt token, one entry per report."""
LAST_REPORTS: dict[int, LoadReport] = {}
"""Each worker's latest load report (its KV size and measured KV hand-over rate)."""


def run_policy(
    bus: Bus,
    spec: Any,
    workers: int,
    policy: str,
    iteration: int,
    parts: list[list[tuple[str, int]]],
) -> dict[str, Any]:
    keys = bus.keys
    total = 0
    for w, part in enumerate(parts):
        for j, (prompt, tokens) in enumerate(part):
            task = SampleTask(
                iteration=iteration, sample_id=f"it{iteration}/w{w}/{j}", prompt_id=f"w{w}-{j}",
                group_id=prompt, sample_index=0, prompt=prompt, max_tokens=tokens,
                temperature=1.0, top_p=1.0, ignore_eos=True,
            )  # fmt: skip
            bus.publish(keys.direct_tasks(f"generation-{w}"), task)
            total += 1
    if policy.startswith("planner"):
        base = "planner"
    elif policy == "balanced":
        base = "none"  # the bound: an even partition (the caller's), no migration
    else:
        base = policy
    reallocator = Reallocator(spec, bus, workers, policy=base)  # type: ignore[arg-type]
    if policy.startswith("planner-recompute"):
        reallocator.mode = "recompute"
    if policy.endswith("unbudgeted"):
        reallocator.config = dataclasses.replace(reallocator.config, overhead_budget=None)
    # The coordinator's predictor persists across iterations; seed it with this batch's length
    # distribution as an earlier iteration of the same prompts would have (by prompt group).
    for part in parts:
        for prompt, tokens in part:
            reallocator.predictor.observe(tokens, group_id=prompt)
    started = time.monotonic()
    trace: list[list[float]] = []
    while bus.samples_done(iteration) < total:
        reallocator.tick(iteration)
        t = time.monotonic() - started
        for w in range(workers):
            report = bus.get(keys.load(worker_name("generation", w)), LoadReport)
            if report is not None:
                for b, sec, tok in report.step_profile:
                    PROFILE.setdefault(int(b), []).append((sec, tok))
                if report.prefill_seconds_per_token:
                    PREFILL.append(report.prefill_seconds_per_token)
                LAST_REPORTS[w] = report
                trace.append([round(t, 3), w, float(sum(s.running for s in report.samples))])
        time.sleep(0.05)
    makespan = time.monotonic() - started
    stats = bus.generation_stats(iteration)
    return {
        "policy": LABELS[policy],
        "makespan": makespan,
        "migrations": int(stats.get("migrations", 0)),
        "kv_migrations": int(stats.get("kv_migrations", 0)),
        "kv_fallbacks": int(stats.get("kv_fallbacks", 0)),
        "kv_snapshot_bytes": stats.get("kv_snapshot_bytes", 0.0),
        "migration_seconds": stats.get("migration_seconds", 0.0),
        "kv_destination_seconds": stats.get("kv_receive_seconds", 0.0)
        + stats.get("kv_load_seconds", 0.0),
        # Seconds the KV snapshots spent on the wire (a thread beside the destination's engine).
        "kv_pull_seconds": stats.get("kv_pull_seconds", 0.0),
        # Engine time the destinations spend re-prefilling recomputed contexts, as the planner
        # modelled it (vLLM does not report a step's prefill and decode apart). KV moves are
        # measured on both sides instead (migration and kv destination seconds).
        "recompute_seconds": reallocator.recompute_seconds,
        "workers": workers,
        "trace": trace,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhfspec bench reallocation", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--long", type=int, default=96, help="long samples, all on worker 0")
    parser.add_argument("--short", type=int, default=96, help="short samples, spread evenly")
    parser.add_argument("--long-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--target-size",
        default=None,
        help="serve a wider/deeper policy computing what the tiny one does (HIDDENxLAYERS, "
        "e.g. 512x8), so a step's time grows with the batch as on a loaded GPU; the 4.2M "
        "policy's step is mostly fixed per-step overhead, which no migration can shorten",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/reallocation.json"))
    parser.add_argument(
        "--replay",
        type=Path,
        default=None,
        help="start no worker: replay a JSON this benchmark wrote in the simulator and print "
        "the check against its real makespans",
    )
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay)
    from rlhfspec_workers.tinymodels import ensure_tiny_models

    kit = ensure_tiny_models(seed=0)
    policy = "tiny://policy"
    if args.target_size:
        from .target import TargetSize, scaled_target

        size = TargetSize.parse(args.target_size)
        policy = str(scaled_target(kit / "policy", size, kit.parent.parent / "bench-targets"))
    manifest = _job(args.workers, args.long_tokens, policy)
    spec = parse_rlhfjob(manifest).spec
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rlhfspec-realloc-") as tmp:
        run_dir = Path(tmp)
        config = run_dir / "job.yaml"
        config.write_text(yaml.safe_dump(manifest))
        with RedisServer(run_dir / "redis", password="bench") as server:
            env = local_worker_env(
                job="bench-realloc", namespace="default", replicas=args.workers,
                redis_port=server.port, redis_password="bench", job_config=config,
                storage=run_dir,
            )  # fmt: skip
            supervisor = Supervisor(run_dir, env)
            try:
                for w in range(args.workers):
                    supervisor.start("generation", w)
                bus = Bus(WorkerEnv.from_environ("coordinator", env))
                while len([s for s in bus.workers().values() if s.state == "ready"]) < args.workers:
                    if supervisor.exited():
                        raise RuntimeError(supervisor.workers[0].tail(30))
                    time.sleep(0.2)
                parts = skewed_partition(args.workers, args.long, args.short, args.long_tokens, 0)
                # One unrecorded round first: the engines' first batches pay one-time costs.
                run_policy(bus, spec, args.workers, "none", 1, parts)
                iteration = 1
                for round_index in range(args.repeats):
                    order = POLICIES if round_index % 2 == 0 else tuple(reversed(POLICIES))
                    for policy in order:
                        iteration += 1
                        given = balanced_partition(parts) if policy == "balanced" else parts
                        results.append(
                            run_policy(bus, spec, args.workers, policy, iteration, given)
                        )
                        print(f"  {LABELS[policy]:>10}: {results[-1]['makespan']:.2f}s, "
                              f"{results[-1]['migrations']} migrations", flush=True)  # fmt: skip
            finally:
                supervisor.stop()
    summary = summarise(results)
    inputs = simulator_inputs(parts, spec)
    summary["simulator"] = simulator_check(inputs, summary)
    print(table(summary))
    print(
        f"ours / balanced (the bound of free, perfect moves): "
        f"{summary['ours']['makespan'] / summary['balanced']['makespan']:.2f}x"
    )
    print_simulator_check(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from rlhfspec_workers.hardware import describe_machine

    doc = {
        "machine": describe_machine(),
        "summary": summary,
        "simulator_inputs": inputs,
        "runs": results,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"[rlhfspec] wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def simulator_inputs(parts: list[list[tuple[str, int]]], spec: Any) -> dict[str, Any]:
    """What the simulator replays a real run from, kept in the JSON (``--replay``): the
    partition, the step table the workers measured (median per batch size over every report)
    and the KV transfer cost they measured."""
    rows = [
        [b, statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals)]
        for b, vals in sorted(PROFILE.items())
    ]
    kv_cost = migration_cost("auto", list(LAST_REPORTS.values()))
    return {
        "partition": [[list(sample) for sample in part] for part in parts],
        "step_table": rows,
        "prefill_seconds_per_token": statistics.median(PREFILL) if PREFILL else None,
        "migration_cost": dataclasses.asdict(kv_cost),
        "max_tokens": spec.generation.max_new_tokens,
        "min_gain_seconds": spec.generation.reallocation.min_gain_seconds,
    }


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in LABELS.values():
        runs = [r for r in results if r["policy"] == label]
        makespan = statistics.median(r["makespan"] for r in runs)
        seconds = statistics.median(r["migration_seconds"] for r in runs)
        kv_seconds = statistics.median(r["kv_destination_seconds"] for r in runs)
        workers = runs[0]["workers"]
        recompute = statistics.median(r["recompute_seconds"] / r["workers"] for r in runs)
        out[label] = {
            "makespan": makespan,
            "migrations": statistics.median(r["migrations"] for r in runs),
            "kv_migrations": statistics.median(r["kv_migrations"] for r in runs),
            "kv_fallbacks": max(r["kv_fallbacks"] for r in runs),
            "overhead_fraction": seconds / makespan,
            "kv_load_fraction": kv_seconds / makespan,
            # Not in the fleet share: the pull overlaps decoding (a NIC's job on a cluster).
            "kv_pull_fraction": statistics.median(r["kv_pull_seconds"] for r in runs)
            / workers
            / makespan,
            "recompute_fraction": recompute / makespan,
            # What the "< 2% of stage time" is about: the fleet's time spent on moves.
            # Measured seconds shared over the workers, plus the modelled re-prefill of
            # recomputed moves (the one cost no worker measures).
            "fleet_fraction": (seconds + kv_seconds) / workers / makespan + recompute / makespan,
        }
    for label in LABELS.values():
        out[label]["vs_static"] = out[label]["makespan"] / out["static"]["makespan"]
    return out


def table(summary: dict[str, Any]) -> str:
    """``moved (kv)``: migrations (of which by KV transfer). Overheads over the makespan:
    ``handover``: the sources' measured seconds (abort, KV export and store, hand-over), summed
    over workers; ``kv load``: the destinations' measured seconds reading and loading KV
    snapshots, summed; ``recompute``: the planner's model of the destinations' re-prefill engine
    time for recomputed moves, per worker (vLLM does not time a step's prefill apart); ``fleet``:
    all of it as a share of the workers' time (handover and kv load divided by the workers)."""
    lines = [
        f"{'policy':<11}{'makespan s':>11}{'x static':>9}{'moved (kv)':>12}{'handover':>9}"
        f"{'kv load':>9}{'recompute':>10}{'fleet':>8}"
    ]
    for label in LABELS.values():
        row = summary[label]
        moved = f"{row['migrations']:.0f} ({row['kv_migrations']:.0f})"
        lines.append(
            f"{label:<11}{row['makespan']:>11.2f}{row['vs_static']:>9.2f}{moved:>12}"
            f"{100 * row['overhead_fraction']:>8.2f}%{100 * row['kv_load_fraction']:>8.2f}%"
            f"{100 * row['recompute_fraction']:>9.2f}%{100 * row['fleet_fraction']:>7.2f}%"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(LABELS.values())
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3), sharey=True)
    for ax, label in zip(axes, labels, strict=True):
        run = next(r for r in results if r["policy"] == label)
        for w in sorted({int(p[1]) for p in run["trace"]}):
            points = [p for p in run["trace"] if int(p[1]) == w]
            ax.plot([p[0] for p in points], [p[2] for p in points], label=f"worker {w}")
        ax.set_title(f"{label}: {run['makespan']:.2f}s, {run['migrations']} migrations")
        ax.set_xlabel("seconds")
    axes[0].set_ylabel("running samples")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
