"""End-to-end benchmark: whole RLHF iterations with speculation adaptive against off.

Where it sits: ``rlhfspec bench e2e`` / ``bench/e2e.py``. It runs the same job through local
mode (real processes, Redis, vLLM, trainer) once per speculative mode, alternating the modes
over ``--repeats`` rounds so a noisy neighbour hurts both alike, and reports each stage's
median seconds per iteration and the whole-iteration ratio. The first iteration of each run
is excluded from the medians (engine warm-up). Timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfspec_api.manifest import RLHFJob, load_rlhfjob, parse_rlhfjob

STAGES = ("generation", "inference", "training", "sync", "total")
MODES = ("off", "adaptive")


def job_with_mode(job: RLHFJob, mode: str, iterations: int) -> RLHFJob:
    manifest: dict[str, Any] = job.to_manifest()
    manifest["metadata"]["name"] = f"{job.name}-{mode}"
    manifest["spec"]["algorithm"]["iterations"] = iterations
    manifest["spec"]["generation"]["speculative"]["mode"] = mode
    if mode == "off":
        manifest["spec"]["generation"]["speculative"].pop("numDraftTokens", None)
    return parse_rlhfjob(manifest)


def run_once(job: RLHFJob, run_dir: Path) -> list[dict[str, Any]]:
    from rlhfspec_workers.local.run import LocalRun, prepare_run_dir

    config = prepare_run_dir(run_dir, job, None, resume=False)
    local = LocalRun(job, run_dir, config, resume=False)
    try:
        code = local.run()
    finally:
        local.stop()
    if code != 0:
        raise RuntimeError(f"{job.name} failed (exit {code}); logs in {run_dir / 'logs'}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def summarise(runs: dict[str, list[list[dict[str, Any]]]]) -> dict[str, Any]:
    """Median seconds per stage and tokens/s per mode, over iterations 2.. of every run."""
    out: dict[str, Any] = {}
    for mode, per_run in runs.items():
        records = [r for run in per_run for r in run[1:]] or [r for run in per_run for r in run]
        out[mode] = {
            stage: statistics.median(r["stage_seconds"].get(stage, 0.0) for r in records)
            for stage in STAGES
        }
        out[mode]["tokens_per_second"] = statistics.median(
            r["tokens_per_second"] or 0.0 for r in records
        )
        out[mode]["reward_mean"] = statistics.median(r["reward_mean"] or 0.0 for r in records)
    if "off" in out and "adaptive" in out:
        out["ratio_total"] = out["off"]["total"] / out["adaptive"]["total"]
        out["ratio_generation"] = out["off"]["generation"] / out["adaptive"]["generation"]
    return out


def table(summary: dict[str, Any]) -> str:
    modes = [m for m in MODES if m in summary]
    lines = [f"{'stage (median s/iter)':<24}" + "".join(f"{m:>12}" for m in modes)]
    for stage in (*STAGES, "tokens_per_second"):
        lines.append(f"{stage:<24}" + "".join(f"{summary[m][stage]:>12.2f}" for m in modes))
    if "ratio_total" in summary:
        lines.append(f"whole iteration: adaptive is {summary['ratio_total']:.2f}x off")
        lines.append(f"generation stage: adaptive is {summary['ratio_generation']:.2f}x off")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhfspec bench e2e", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, nargs="?", default=Path("examples/tiny-grpo.yaml"))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/e2e.json"))
    args = parser.parse_args(argv)
    base = load_rlhfjob(args.manifest)
    runs: dict[str, list[list[dict[str, Any]]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="rlhfspec-e2e-") as tmp:
        for round_index in range(args.repeats):
            order = MODES if round_index % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                job = job_with_mode(base, mode, args.iterations)
                runs[mode].append(run_once(job, Path(tmp) / f"{mode}-{round_index}"))
    summary = summarise(runs)
    print(table(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")
    print(f"[rlhfspec] wrote {args.out}")
    return 0
