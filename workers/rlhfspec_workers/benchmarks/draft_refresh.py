"""``rlhfspec bench draft-refresh``: does keeping the draft model fresh pay for itself?

Where it sits: ``rlhfspec bench draft-refresh`` / ``bench/draft_refresh.py``. As GRPO moves
the policy, a draft distilled from the initial weights goes stale and its acceptance falls.
A ``draft_model`` drafter with ``refresh`` set has the trainer distil it again on each
iteration's rollouts (``drafts/v<N>``), and generation drafts with it from the next
iteration on. This runs one multi-iteration GRPO job per arm, in local mode as
``rlhfspec bench learning`` runs its job (:func:`.learning.run_local`, the manifest from
:func:`.learning.job_manifest`):

- ``none``: speculative mode off;
- ``frozen``: mode fixed, the ``draft_model`` drafter, k = ``--k``, never refreshed;
- ``refreshed``: the same with ``refresh: {every: 1, steps: --refresh-steps}``; by default
  the refresh overlaps the next iteration's generation (the draft distilled on iteration N's
  rollouts drafts N+2), ``--no-overlap`` refreshes before the weights are published (N+1).

Mode fixed keeps the comparison to the draft's quality: an adaptive selector would stop
drafting with a stale draft and hide what it costs. Every arm has the same seed, rows,
reward and learning rate; arms run one at a time (never side by side on this machine), in
``--rounds`` rounds whose order rotates, and each iteration's figures are the median over
the rounds. What is compared comes from each run's metrics.jsonl (``IterationMetrics``):
the draft's acceptance and version, generation tokens/s and seconds, the trainer's refresh
seconds and the iteration's total seconds. "Refresh pays" is the generation time the fresh
draft saved over the frozen one divided by the time spent refreshing it: above 1 the
refresh earns back its own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rlhfspec_workers.benchmarks.learning import (
    DEFAULTS,
    TASKS,
    Task,
    job_manifest,
    run_local,
    task_files,
)
from rlhfspec_workers.benchmarks.trl_reference import GrpoSetup
from rlhfspec_workers.hardware import available_cores

ARMS = ("none", "frozen", "refreshed")
MODELS = ("tiny", "smollm2")
DRAFTER = "draft_model"
MAX_K = 8
TINY_DRAFT = "tiny://draft"
# The per-iteration figures kept from a metrics row (medians across rounds).
FIELDS = (
    "draft_acceptance", "draft_version", "tokens", "generation_tokens_per_second",
    "generation_seconds", "draft_refresh_seconds", "total_seconds", "mean_accepted_length",
    "reward_mean",
)  # fmt: skip


# --- the pure part: metrics rows -> per-iteration medians -> ratios -------------------------


def iteration_row(record: dict[str, Any]) -> dict[str, Any]:
    """One metrics.jsonl record as this benchmark reads it (None: not reported)."""
    stages = record.get("stage_seconds") or {}
    acceptance = (record.get("draft_acceptance") or {}).get(DRAFTER)
    return {
        "iteration": int(record["iteration"]),
        "draft_acceptance": acceptance,
        "draft_version": record.get("draft_version"),
        "tokens": record.get("tokens"),
        # IterationMetrics.tokens_per_second is the iteration's tokens over its generation
        # stage's seconds: generation throughput, not whole-iteration throughput.
        "generation_tokens_per_second": record.get("tokens_per_second"),
        "generation_seconds": stages.get("generation"),
        "draft_refresh_seconds": record.get("draft_refresh_seconds", 0.0),
        "total_seconds": stages.get("total"),
        "mean_accepted_length": record.get("mean_accepted_length"),
        "reward_mean": record.get("reward_mean"),
    }


def _median(values: list[Any], low: bool = False) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return statistics.median_low(present) if low else statistics.median(present)


def median_rows(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per iteration, the median of each field over the rounds' runs (None where no round
    reported it). Draft versions take the lower median, so they stay versions that ran."""
    by_iteration: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        for row in run:
            by_iteration.setdefault(int(row["iteration"]), []).append(row)
    out = []
    for iteration in sorted(by_iteration):
        rows = by_iteration[iteration]
        merged: dict[str, Any] = {"iteration": iteration}
        for name in FIELDS:
            merged[name] = _median([r.get(name) for r in rows], low=name == "draft_version")
        out.append(merged)
    return out


def _sum(rows: Sequence[dict[str, Any]], name: str) -> float:
    return float(sum(r[name] or 0.0 for r in rows))


def _ratio(top: float | None, bottom: float | None) -> float | None:
    if top is None or bottom is None or bottom <= 0:
        return None
    return top / bottom


def overall_tokens_per_second(rows: Sequence[dict[str, Any]]) -> float | None:
    """An arm's generation throughput over the whole run: its tokens over its generation
    seconds (not a mean of per-iteration rates, which would weigh short iterations alike)."""
    return _ratio(_sum(rows, "tokens"), _sum(rows, "generation_seconds"))


def compare(top: Sequence[dict[str, Any]], bottom: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Generation tokens/s of one arm over another's, per iteration (matched by number) and
    overall."""
    theirs = {r["iteration"]: r for r in bottom}
    per_iteration = [
        _ratio(r["generation_tokens_per_second"],
               theirs[r["iteration"]]["generation_tokens_per_second"])
        if r["iteration"] in theirs else None
        for r in top
    ]  # fmt: skip
    overall = _ratio(overall_tokens_per_second(top), overall_tokens_per_second(bottom))
    return {"per_iteration": per_iteration, "overall": overall}


def summarise(medians: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each arm's totals, and the ratios between the arms present."""
    arms: dict[str, dict[str, Any]] = {
        arm: {
            "iterations": rows,
            "generation_tokens_per_second": overall_tokens_per_second(rows),
            "generation_seconds": _sum(rows, "generation_seconds"),
            "draft_refresh_seconds": _sum(rows, "draft_refresh_seconds"),
            "total_seconds": _sum(rows, "total_seconds"),
        }
        for arm, rows in medians.items()
    }
    ratios: dict[str, Any] = {}
    for top, bottom in (("refreshed", "frozen"), ("refreshed", "none"), ("frozen", "none")):
        if top in medians and bottom in medians:
            ratios[f"{top}_vs_{bottom}"] = compare(medians[top], medians[bottom])
    if "refreshed" in arms and "frozen" in arms:
        fresh, stale = arms["refreshed"], arms["frozen"]
        saved = stale["generation_seconds"] - fresh["generation_seconds"]
        spent = fresh["draft_refresh_seconds"]
        # The same, counting only iterations drafted with a refreshed draft (version > 0): the
        # first iteration drafts with the same draft in both arms, and its warm-up dominates
        # its generation time, so there the arms differ by noise alone.
        frozen_by_iteration = {r["iteration"]: r for r in medians["frozen"]}
        drafted_fresh = [
            r for r in medians["refreshed"]
            if (r["draft_version"] or 0) > 0 and r["iteration"] in frozen_by_iteration
        ]  # fmt: skip
        saved_fresh = sum(
            (frozen_by_iteration[r["iteration"]]["generation_seconds"] or 0.0)
            - (r["generation_seconds"] or 0.0)
            for r in drafted_fresh
        )
        ratios["refresh_pays"] = {
            "generation_seconds_saved": saved,
            "draft_refresh_seconds": spent,
            "ratio": _ratio(saved, spent),
            "fresh_iterations": [r["iteration"] for r in drafted_fresh],
            "fresh_generation_seconds_saved": saved_fresh,
            "fresh_ratio": _ratio(saved_fresh, spent) if drafted_fresh else None,
        }
        ratios["end_to_end_frozen_over_refreshed"] = _ratio(
            stale["total_seconds"], fresh["total_seconds"]
        )
    return {"arms": arms, "ratios": ratios}


def _cell(value: Any, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def _ratios_text(ratio: dict[str, Any]) -> str:
    per = " ".join(_cell(x, ".2f", 0) for x in ratio["per_iteration"])
    return f"{per}; overall {_cell(ratio['overall'], '.2f', 0)}"


def table(summary: dict[str, Any]) -> list[str]:
    """The printed form of :func:`summarise`'s result."""
    lines = [
        f"{'arm':<10}{'iter':>5}{'accept':>8}{'draft v':>8}{'gen tok/s':>11}{'gen s':>8}"
        f"{'refresh s':>10}{'total s':>9}"
    ]
    for arm, doc in summary["arms"].items():
        for r in doc["iterations"]:
            lines.append(
                f"{arm:<10}{r['iteration']:>5}{_cell(r['draft_acceptance'], '.3f', 8)}"
                f"{_cell(r['draft_version'], 'd', 8)}"
                f"{_cell(r['generation_tokens_per_second'], '.1f', 11)}"
                f"{_cell(r['generation_seconds'], '.2f', 8)}"
                f"{_cell(r['draft_refresh_seconds'], '.2f', 10)}"
                f"{_cell(r['total_seconds'], '.2f', 9)}"
            )  # fmt: skip
        lines.append(
            f"{arm:<10}{'all':>5}{'':>16}{_cell(doc['generation_tokens_per_second'], '.1f', 11)}"
            f"{doc['generation_seconds']:>8.2f}{doc['draft_refresh_seconds']:>10.2f}"
            f"{doc['total_seconds']:>9.2f}"
        )  # fmt: skip
    ratios = summary["ratios"]
    for key in ("refreshed_vs_frozen", "refreshed_vs_none", "frozen_vs_none"):
        if key in ratios:
            top, bottom = key.split("_vs_")
            lines.append(
                f"generation tok/s {top}/{bottom} per iteration: {_ratios_text(ratios[key])}"
            )
    pays = ratios.get("refresh_pays")
    if pays is not None:
        verdict = (
            ""
            if pays["ratio"] is None
            else (": pays for itself" if pays["ratio"] > 1 else ": does not pay for itself")
        )
        lines.append(
            f"refresh pays: frozen - refreshed generation seconds "
            f"{pays['generation_seconds_saved']:.2f} / refresh seconds "
            f"{pays['draft_refresh_seconds']:.2f} = {_cell(pays['ratio'], '.2f', 0)}{verdict}"
        )  # fmt: skip
        if pays["fresh_iterations"]:
            lines.append(
                f"  counting only iterations drafted with a refreshed draft "
                f"({', '.join(map(str, pays['fresh_iterations']))}): "
                f"{pays['fresh_generation_seconds_saved']:.2f} s saved = "
                f"{_cell(pays['fresh_ratio'], '.2f', 0)}"
            )
        lines.append(
            "end to end, total seconds frozen/refreshed: "
            f"{_cell(ratios['end_to_end_frozen_over_refreshed'], '.3f', 0)}"
        )
    return lines


# --- running the arms -----------------------------------------------------------------------


def speculative(
    arm: str, draft: str, k: int, refresh_steps: int, overlap: bool = True
) -> dict[str, Any]:
    """``spec.generation.speculative`` of an arm (``overlap``: the refresh's)."""
    if arm == "none":
        return {"mode": "off"}
    drafter: dict[str, Any] = {"method": DRAFTER, "model": {"path": draft}}
    if arm == "refreshed":
        drafter["refresh"] = {"every": 1, "steps": refresh_steps, "overlap": overlap}
    return {"mode": "fixed", "maxDraftTokens": k, "numDraftTokens": k, "drafters": [drafter]}


def arm_manifest(
    task: Task,
    setup: GrpoSetup,
    arm: str,
    draft: str,
    k: int,
    refresh_steps: int,
    overlap: bool = True,
) -> dict[str, Any]:
    """The RLHFJob of an arm: the learning benchmark's job for the task, without its held-out
    evaluation (not measured here), with the arm's speculative decoding."""
    job = job_manifest(task, setup, arm, trainer_cpu=available_cores())
    job["metadata"]["name"] = f"draft-refresh-{task.name}-{arm}"
    for key in ("eval", "evalEvery", "evalMaxTokens"):
        job["spec"]["dataset"].pop(key, None)
    job["spec"]["generation"]["speculative"] = speculative(arm, draft, k, refresh_steps, overlap)
    return job


def rotated(arms: Sequence[str], round_index: int) -> list[str]:
    """Round r runs the arms starting from the r-th, so no arm always runs first."""
    shift = round_index % len(arms)
    return [*arms[shift:], *arms[:shift]]


def grpo_setup(model: str, iterations: int, seed: int, lr: float | None) -> tuple[Task, GrpoSetup]:
    """The task and GRPO numbers of ``--model``: tiny, the example job's batch
    (examples/tiny-grpo.yaml); smollm2, the learning benchmark's arithmetic chat task."""
    task = TASKS[model]
    model_dir, train, held_out = task_files(task)
    spec = yaml.safe_load(task.manifest.read_text(encoding="utf-8"))["spec"]
    algorithm, generation = spec["algorithm"], spec["generation"]
    if model == "tiny":
        numbers: dict[str, Any] = dict(
            prompts_per_step=algorithm["promptsPerIteration"],
            group_size=algorithm["samplesPerPrompt"],
            learning_rate=algorithm["learningRate"],
            kl_coef=algorithm["klCoef"],
            clip_range=algorithm["clipRange"],
            max_new_tokens=generation["maxNewTokens"],
            temperature=generation["temperature"],
        )
    else:
        numbers = {k: v for k, v in DEFAULTS[model].items() if not k.startswith("eval_")}
    numbers.update(steps=iterations, seed=seed)
    if lr is not None:
        numbers["learning_rate"] = lr
    micro = int(algorithm.get("microBatchSize", 8))
    return task, GrpoSetup(model_dir, train, held_out, micro_batch_size=micro, **numbers)


def read_rows(metrics: Path) -> list[dict[str, Any]]:
    lines = metrics.read_text(encoding="utf-8").splitlines()
    return [iteration_row(json.loads(line)) for line in lines if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfspec bench draft-refresh", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (default): examples/tiny-grpo.yaml's policy, draft, rows and reward; "
        "smollm2: SmolLM2-135M-Instruct on the arithmetic chat task (needs --draft)",
    )
    parser.add_argument(
        "--draft", type=Path, help="draft model directory (rlhfspec models distill-draft); "
        "required with --model smollm2, default tiny://draft with --model tiny",
    )  # fmt: skip
    parser.add_argument("--iterations", type=int, default=8, help="GRPO iterations per arm (>= 2)")
    parser.add_argument("--k", type=int, default=4, help=f"draft length, 1..{MAX_K}")
    parser.add_argument(
        "--refresh-steps", type=int, default=16, help="distillation steps per refresh"
    )
    parser.add_argument(
        "--no-overlap", action="store_true",
        help="refresh before the weights are published (refresh.overlap: false): the draft "
        "distilled on iteration N's rollouts drafts N+1 and the refresh is on the critical "
        "path; default (overlap): it is distilled while N+1 generates and drafts N+2",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="runs of every arm (rotating order)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    parser.add_argument("--lr", type=float, help="learning rate (default: the task's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/draft-refresh"),
        help="output directory (draft_refresh.json and the runs)",
    )  # fmt: skip
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    """What is wrong with the flags, each message naming its flag."""
    errors = []
    if args.model not in MODELS:
        errors.append(f"--model: {args.model!r} is not one of {', '.join(MODELS)}")
    if args.iterations < 2:
        errors.append(f"--iterations: {args.iterations} (a refresh shows from the 2nd; >= 2)")
    if not 1 <= args.k <= MAX_K:
        errors.append(f"--k: {args.k} is outside 1..{MAX_K}")
    if args.refresh_steps < 1:
        errors.append(f"--refresh-steps: {args.refresh_steps} (>= 1)")
    if args.rounds < 1:
        errors.append(f"--rounds: {args.rounds} (>= 1)")
    arms = [a for a in args.arms.split(",") if a]
    if not arms or any(a not in ARMS for a in arms) or len(set(arms)) != len(arms):
        errors.append(f"--arms: {args.arms!r}; a comma list of distinct {', '.join(ARMS)}")
    if args.model == "smollm2" and args.draft is None:
        errors.append("--draft: required with --model smollm2 (a directory written by "
                      "rlhfspec models distill-draft)")  # fmt: skip
    if args.draft is not None and not args.draft.is_dir():
        errors.append(f"--draft: {args.draft} is not a directory")
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors = check_args(args)
    if errors:
        print("\n".join(f"rlhfspec bench draft-refresh: {e}" for e in errors), file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    arms = [a for a in args.arms.split(",") if a]
    task, setup = grpo_setup(args.model, args.iterations, args.seed, args.lr)
    draft = TINY_DRAFT if args.draft is None else str(args.draft.resolve())
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": args.model, "draft": draft, "k": args.k, "refresh_steps": args.refresh_steps,
        "refresh_overlap": not args.no_overlap,
        "rounds": args.rounds, "arms": arms,
        "setup": {k: str(v) if isinstance(v, Path) else v for k, v in vars(setup).items()},
    }  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    doc: dict[str, Any] = {}
    for round_index in range(args.rounds):
        for arm in rotated(arms, round_index):
            run_dir = out / f"round-{round_index + 1}" / arm
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed one
            job = arm_manifest(
                task, setup, arm, draft, args.k, args.refresh_steps, not args.no_overlap
            )
            print(f"[draft-refresh] round {round_index + 1}/{args.rounds}: {arm}", flush=True)
            seconds = run_local(job, run_dir, arm)
            rows = read_rows(run_dir / "metrics.jsonl")
            runs[arm].append({"round": round_index + 1, "wall_seconds": seconds, "rows": rows})
            medians = {a: median_rows([r["rows"] for r in runs[a]]) for a in arms if runs[a]}
            doc = {"settings": settings, "runs": runs, **summarise(medians)}
            (out / "draft_refresh.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(table(doc)))
    print(f"[draft-refresh] wrote {out / 'draft_refresh.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
