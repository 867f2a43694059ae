"""The reallocation benchmark's check of the simulator against the real run it just made.

Where it sits: ``rlhfspec bench reallocation`` (``benchmarks.reallocation``) ends by replaying
its own partition in the simulator (``reallocation.simulator``) on what its real workers
measured (``simulator_inputs`` in its JSON: step table, prefill rate, KV cost, the job's
planner settings) and printing real / simulated makespan per policy; ``--replay FILE`` does
the same from a saved JSON without starting a worker. The simulator's many-worker tables
(``benchmarks.reallocation_sim``) can be trusted as far as this agrees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhfspec_workers.reallocation.model import MigrationCost, ThroughputModel
from rlhfspec_workers.reallocation.planner import PlannerConfig
from rlhfspec_workers.reallocation.simulator import SimConfig, simulate
from rlhfspec_workers.reallocation.workload import SimSample

from .reallocation_sim import simulate_policies


def balanced_partition(parts: list[list[tuple[str, int]]]) -> list[list[tuple[str, int]]]:
    """The same samples dealt round-robin from the longest down: every worker gets an equal
    share of the long tail."""
    ranked = sorted((s for part in parts for s in part), key=lambda s: -s[1])
    return [ranked[w :: len(parts)] for w in range(len(parts))]


def simulator_check(inputs: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Replay the same partitions in the simulator, driven by the step times the real workers
    measured, so the simulator's many-worker tables can be trusted as far as this agrees:
    static and balanced (no migration: the step table and the prefill of every prompt),
    threshold, ours as the job ran it (KV transfer priced from what the workers measured) and
    ours recomputing. Real/simulated makespans per policy are in ``real_over_simulated``."""
    rows = [(int(b), float(sec), float(tok)) for b, sec, tok in inputs["step_table"]]
    # The workers' measured prefill rate; older runs have none (from_table then guesses).
    per_token = inputs.get("prefill_seconds_per_token") or None
    speed = ThroughputModel.from_table(rows, prefill_seconds_per_token=per_token)
    parts = [[(str(p), int(n)) for p, n in part] for part in inputs["partition"]]

    def samples(partition: list[list[tuple[str, int]]]) -> list[list[SimSample]]:
        return [
            [SimSample(f"w{w}/{j}", tokens, len(prompt), prompt) for j, (prompt, tokens) in
             enumerate(part)]
            for w, part in enumerate(partition)
        ]  # fmt: skip

    sim_parts = samples(parts)
    workers = len(parts)
    kv_cost = MigrationCost(**inputs["migration_cost"])
    # As the job's coordinator: its planner settings, and a predictor that has seen this
    # batch's lengths by prompt (run_policy seeds the real one the same way).
    history = [s for part in sim_parts for s in part]
    max_tokens = int(inputs.get("max_tokens", 4096))
    planner = PlannerConfig(min_gain_seconds=float(inputs.get("min_gain_seconds", 0.0)))

    def policies(cost: MigrationCost | None) -> dict[str, Any]:
        return simulate_policies(
            [workers], None, speed, partitions={workers: sim_parts}, history=history,
            max_tokens=max_tokens, planner=planner, migration_cost=cost,
        )  # fmt: skip

    result = policies(kv_cost)
    recompute = policies(None)
    balanced = simulate(samples(balanced_partition(parts)), speed, SimConfig(policy="static"))
    row = result["rows"][0]
    static = row["static_seconds"]
    simulated = {
        "static": static,
        "balanced": balanced.makespan_seconds,
        "threshold": row["threshold_ratio"] * static,
        "ours": row["ours_ratio"] * static,
        "recompute": recompute["rows"][0]["ours_ratio"] * static,
    }
    return {
        "static_seconds": static,
        "balanced_ratio": balanced.makespan_seconds / static,
        "threshold_ratio": row["threshold_ratio"],
        "ours_ratio": row["ours_ratio"],
        "recompute_ratio": recompute["rows"][0]["ours_ratio"],
        "migrations": row["migrations"],
        "recompute_migrations": recompute["rows"][0]["migrations"],
        "kv_bytes_per_token": kv_cost.kv_bytes_per_token,
        "kv_bytes_per_second": kv_cost.kv_bandwidth_bytes_per_second,
        "real_over_simulated": {
            label: summary[label]["makespan"] / seconds for label, seconds in simulated.items()
        },
    }


def replay(path: Path) -> int:
    doc = json.loads(path.read_text())
    if "simulator_inputs" not in doc:
        raise SystemExit(f"{path}: no simulator_inputs (written by an older version)")
    summary = doc["summary"]
    summary["simulator"] = simulator_check(doc["simulator_inputs"], summary)
    print_simulator_check(summary)
    return 0


def print_simulator_check(summary: dict[str, Any]) -> None:
    sim = summary["simulator"]
    print(
        f"simulator on the measured step table: static {sim['static_seconds']:.2f}s "
        f"(real {summary['static']['makespan']:.2f}s); x static, simulated (real): balanced "
        f"{sim['balanced_ratio']:.2f} ({summary['balanced']['vs_static']:.2f}), threshold "
        f"{sim['threshold_ratio']:.2f} ({summary['threshold']['vs_static']:.2f}), ours "
        f"{sim['ours_ratio']:.2f} ({summary['ours']['vs_static']:.2f}), ours recomputing "
        f"{sim['recompute_ratio']:.2f} ({summary['recompute']['vs_static']:.2f}); migrations, "
        f"simulated (real): ours {sim['migrations']} ({summary['ours']['migrations']:.0f}), "
        f"recomputing {sim['recompute_migrations']} ({summary['recompute']['migrations']:.0f})"
    )
    print(
        "real / simulated makespan: "
        + ", ".join(f"{k} {v:.2f}" for k, v in sim["real_over_simulated"].items())
    )
