"""``rlhfspec bench learning``: does training raise held-out accuracy, and how fast vs TRL?

Where it sits: ``rlhfspec bench learning`` / ``bench/learning.py``. Three arms on one setup
(:class:`.trl_reference.GrpoSetup`: model, rows, reward, group size, prompts per step, token
cap, learning rate, KL coefficient, clip range, seed):

- ``rlhfspec``: an RLHFJob run in local mode (what ``rlhfspec run`` does: preflight, Redis,
  the worker processes) with the held-out split as ``dataset.eval``; its accuracy curve is
  the run's own greedy eval (``eval_accuracy`` in metrics.jsonl, vLLM) against the
  iterations' summed stage seconds;
- ``shuffled``: the same job with the rule replaced by a function reward that scores with the
  same rule and then permutes the scores across the batch (:func:`shuffled_math_answer`), so
  rewards keep their level but lose their link to the responses: what a job "learns" from
  them is the control's drift;
- ``trl``: TRL's ``GRPOTrainer`` on the same setup (:mod:`.trl_reference`).

Every arm's accuracy before and after is also measured by one evaluator
(:mod:`.heldout`: HF ``generate``, greedy, fp32, a cut response scores 0), on the initial
weights once and on each arm's final weights. Tasks: ``smollm2`` (SmolLM2-135M-Instruct on
the arithmetic word problems of :mod:`rlhfspec_workers.data.arithmetic`, reward
``math_answer``) and ``tiny`` (the tiny kit's sort-digits policy, reward ``sort_digits``), the
second mainly to compare wall clocks. Writes ``learning.json`` and ``learning.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhfspec_workers.benchmarks.heldout import (
    SCORERS,
    EvalRow,
    greedy_accuracy,
    load_policy,
    math_answer_scores,
    read_eval_rows,
)
from rlhfspec_workers.benchmarks.trl_reference import ArmResult, GrpoSetup
from rlhfspec_workers.hardware import available_cores
from rlhfspec_workers.rewards import sort_digits

ROOT = Path(__file__).resolve().parents[3]
ARMS = ("rlhfspec", "shuffled", "trl")
SHUFFLE_SEED_ENV = "RLHFSPEC_SHUFFLE_SEED"
_SHUFFLE = random.Random(int(os.environ.get(SHUFFLE_SEED_ENV, "0")))


def _truncated(metadata: Sequence[Any]) -> list[bool]:
    return [isinstance(m, dict) and m.get("finish_reason") == "length" for m in metadata]


def _shuffled(scores: list[float]) -> list[float]:
    _SHUFFLE.shuffle(scores)
    return scores


def shuffled_math_answer(
    prompts: Sequence[Any],
    responses: Sequence[str],
    answers: Sequence[str | None],
    metadata: Sequence[Any],
) -> list[float]:
    """The shuffled-reward control (a ``function`` reward): the ``math_answer`` rule's scores
    (0 for a response cut at the token cap), permuted across the batch by a seeded RNG
    (``RLHFSPEC_SHUFFLE_SEED``, default 0)."""
    return _shuffled(math_answer_scores(responses, answers, _truncated(metadata)))


def shuffled_sort_digits(
    prompts: Sequence[Any],
    responses: Sequence[str],
    answers: Sequence[str | None],
    metadata: Sequence[Any],
) -> list[float]:
    """The shuffled-reward control of the tiny task: ``sort_digits`` scores, permuted."""
    scores = [
        0.0 if cut else sort_digits.score(str(prompt), response)
        for prompt, response, cut in zip(prompts, responses, _truncated(metadata), strict=True)
    ]
    return _shuffled(scores)


@dataclass(frozen=True)
class Task:
    """What a ``--model`` trains on."""

    name: str
    manifest: Path
    """The example job the arms' manifests start from."""
    policy: str
    rule: str
    shuffled: str
    """The control's function reward (``module:function``)."""


TASKS = {
    "smollm2": Task(
        "smollm2", ROOT / "examples" / "smollm2-grpo.yaml", "zoo://smollm2-135m-instruct",
        "math_answer", f"{__name__}:shuffled_math_answer",
    ),
    "tiny": Task(
        "tiny", ROOT / "examples" / "tiny-grpo.yaml", "tiny://policy",
        "sort_digits", f"{__name__}:shuffled_sort_digits",
    ),
}  # fmt: skip


def job_manifest(
    task: Task, setup: GrpoSetup, arm: str, trainer_cpu: int | None = None
) -> dict[str, Any]:
    """The RLHFJob of an arm: the task's example job with the setup's numbers
    (``trainer_cpu``: the trainer's cores, default the example's)."""
    job: dict[str, Any] = yaml.safe_load(task.manifest.read_text(encoding="utf-8"))
    job["metadata"]["name"] = f"learning-{task.name}-{arm}"
    spec = job["spec"]
    # The loss is a token mean over the whole batch however it is cut, as TRL's over its
    # gradient-accumulation steps; both arms cut it into the same micro-batches.
    micro = setup.micro_batch
    spec["algorithm"].update(
        name="grpo",
        iterations=setup.steps,
        promptsPerIteration=setup.prompts_per_step,
        samplesPerPrompt=setup.group_size,
        learningRate=setup.learning_rate,
        klCoef=setup.kl_coef,
        clipRange=setup.clip_range,
        microBatchSize=micro,
        miniBatches=1,
        seed=setup.seed,
    )
    spec["models"]["policy"] = {"path": task.policy}
    spec["reward"] = (
        {"type": "function", "function": task.shuffled}
        if arm == "shuffled"
        else {"type": "rule", "rule": task.rule}
    )
    spec["dataset"].update(
        path=str(setup.train_path),
        eval=str(setup.eval_path),
        evalEvery=setup.eval_every,
        evalMaxTokens=setup.eval_tokens,
    )
    generation = spec["generation"]
    generation.update(maxNewTokens=setup.max_new_tokens, temperature=setup.temperature)
    generation["dtype"] = "float32"
    generation.setdefault("reallocation", {})["enabled"] = False
    spec["trainer"].update(checkpointEvery=setup.steps, keepCheckpoints=1)
    if trainer_cpu is not None:
        spec["trainer"].setdefault("resources", {})["cpu"] = str(trainer_cpu)
    return job


def read_curve(metrics_path: Path) -> tuple[float | None, list[list[float]], list[float]]:
    """From a run's metrics.jsonl: the baseline accuracy, ``[training seconds, iteration,
    eval accuracy]`` rows (seconds: the iterations' summed stage totals, eval excluded) and
    each iteration's total seconds."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    baseline = records[0].get("baseline_eval_accuracy") if records else None
    curve: list[list[float]] = [] if baseline is None else [[0.0, 0.0, float(baseline)]]
    seconds: list[float] = []
    clock = 0.0
    for record in records:
        stages = record.get("stage_seconds", {})
        step = float(stages.get("total", 0.0)) - float(stages.get("eval", 0.0))
        seconds.append(step)
        clock += step
        if record.get("eval_accuracy") is not None:
            curve.append([clock, float(record["iteration"]), float(record["eval_accuracy"])])
    return (None if baseline is None else float(baseline)), curve, seconds


def run_local(
    job: dict[str, Any], run_dir: Path, label: str, env: Mapping[str, str] | None = None
) -> float:
    """Runs an RLHFJob manifest through ``rlhfspec run``'s code path into ``run_dir`` (the
    manifest written beside it as ``<run_dir>.yaml``), with ``env`` set while it runs; its
    wall seconds. Raises, naming ``label`` and the logs, when the run fails."""
    from rlhfspec_workers.local.run import main as run_main

    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = run_dir.with_suffix(".yaml")
    manifest.write_text(yaml.safe_dump(job, sort_keys=False))
    env = dict(env or {})
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    started = time.perf_counter()
    try:
        code = run_main([str(manifest), "--run-dir", str(run_dir)])
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{label}: rlhfspec run failed (exit {code}); logs in {run_dir}/logs")
    return seconds


def run_job_arm(task: Task, setup: GrpoSetup, arm: str, out: Path) -> ArmResult:
    """An RLHFSpec arm: the job through ``rlhfspec run``'s code path, then its curve."""
    result = ArmResult(arm)
    run_dir = out / arm
    # TRL trains in one process on every core. Arms run one at a time, and a job's trainer
    # runs while its other workers wait for the weights, so it gets the same cores.
    job = job_manifest(task, setup, arm, trainer_cpu=available_cores())
    env = {SHUFFLE_SEED_ENV: str(setup.seed)}
    result.total_seconds = run_local(job, run_dir, arm, env)
    baseline, result.curve, result.step_seconds = read_curve(run_dir / "metrics.jsonl")
    result.wall_seconds = sum(result.step_seconds)
    if baseline is None:
        result.notes.append("metrics.jsonl has no baseline_eval_accuracy (no eval split ran)")
    return result


def final_policy(run_dir: Path) -> Path:
    """The policy dir of a run's last trainer checkpoint."""
    found = sorted((run_dir / "checkpoints").glob("iter-*/policy"))
    if not found:
        raise RuntimeError(f"no checkpoint in {run_dir / 'checkpoints'}")
    return found[-1]


def evaluate_dir(
    model_dir: Path, tokenizer_dir: Path, rows: list[EvalRow], setup: GrpoSetup, scorer: str
) -> float:
    model, tokenizer = load_policy(model_dir, tokenizer_dir)
    result = greedy_accuracy(model, tokenizer, rows, setup.eval_tokens, SCORERS[scorer])
    return result.accuracy


def summary_lines(results: dict[str, ArmResult], setup: GrpoSetup) -> list[str]:
    lines = [
        f"{setup.steps} steps x {setup.prompts_per_step} prompts x {setup.group_size} samples, "
        f"{setup.max_new_tokens} tokens, lr {setup.learning_rate:g}, kl {setup.kl_coef:g}; "
        f"held-out: {setup.eval_rows} rows, greedy",
        f"{'arm':<10}{'before':>8}{'after':>8}{'change':>8}{'train s':>9}{'s/step':>8}"
        f"{'total s':>9}",
    ]
    for name, r in results.items():
        change = None if r.before is None or r.after is None else r.after - r.before
        cells = [r.before, r.after, change]
        lines.append(
            f"{name:<10}" + "".join("       -" if c is None else f"{c:>8.3f}" for c in cells)
            + f"{r.wall_seconds:>9.0f}{r.seconds_per_step or 0.0:>8.1f}{r.total_seconds:>9.0f}"
        )  # fmt: skip
    for name, r in results.items():
        if r.curve:
            points = ", ".join(f"{s:.0f}s {a:.3f}" for s, _, a in r.curve)
            lines.append(f"{name} accuracy vs training seconds: {points}")
        lines.extend(f"{name}: {note}" for note in r.notes)
    ours, trl = results.get("rlhfspec"), results.get("trl")
    if ours and trl and ours.seconds_per_step and trl.seconds_per_step:
        theirs, mine = trl.seconds_per_step, ours.seconds_per_step
        lines.append(
            f"wall clock per step ({setup.rollouts_per_step} rollouts): TRL {theirs:.1f}s, "
            f"RLHFSpec {mine:.1f}s: TRL takes {theirs / mine:.2f}x RLHFSpec's time"
        )
    return lines


def plot(results: dict[str, ArmResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, r in results.items():
        if r.curve:
            ax.plot([c[0] for c in r.curve], [c[2] for c in r.curve], marker="o", label=name)
    ax.set_xlabel("training wall seconds (evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DEFAULTS: dict[str, dict[str, Any]] = {
    # Sized for this 2-core CPU: see bench/README.md and docs/performance.md for what they
    # measured. SmolLM2: 24 GRPO steps at T=0.7 took greedy held-out accuracy on 128 rows from
    # 0.188 to 0.328, the shuffled-reward control's to 0.211; at T=1.0 or 96 tokens most
    # answers are wrong or cut off and GRPO gets almost no signal.
    "smollm2": dict(steps=24, prompts_per_step=4, group_size=8, max_new_tokens=128,
                    learning_rate=2e-5, eval_rows=128, eval_every=12, temperature=0.7),
    "tiny": dict(steps=10, prompts_per_step=16, group_size=8, max_new_tokens=48,
                 learning_rate=5e-5, eval_rows=128, eval_every=2),
}  # fmt: skip
QUICK = dict(steps=2, eval_rows=16, eval_every=1)


def task_files(task: Task) -> tuple[Path, Path, Path]:
    """The policy dir (initial weights), the train rows and the full held-out file."""
    if task.name == "tiny":
        from rlhfspec_workers.tinymodels import ensure_tiny_models

        kit = ensure_tiny_models(seed=0)
        return kit / "policy", kit / "dataset" / "train.jsonl", kit / "dataset" / "eval.jsonl"
    from rlhfspec_workers.zoo import ensure_zoo_model

    # `rlhfspec data make arithmetic --n 1000 --eval-n 128` (seed 0) wrote these two files.
    data = ROOT / "examples" / "data"
    model_dir = ensure_zoo_model(task.policy.removeprefix("zoo://"))
    return model_dir, data / "arith-train.jsonl", data / "arith-eval.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfspec bench learning", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model",
        choices=sorted(TASKS),
        default="smollm2",
        help="smollm2 (default): SmolLM2-135M-Instruct on arithmetic word problems, reward "
        "math_answer; tiny: the tiny kit's sort-digits policy (fast; compares wall clocks)",
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, help="iterations / optimizer steps")
    parser.add_argument("--prompts", dest="prompts_per_step", type=int, help="prompts per step")
    parser.add_argument("--group", dest="group_size", type=int, help="samples per prompt")
    parser.add_argument("--max-tokens", dest="max_new_tokens", type=int, help="response cap")
    parser.add_argument("--lr", dest="learning_rate", type=float, help="learning rate")
    parser.add_argument("--kl", dest="kl_coef", type=float, help="KL coefficient (TRL's beta)")
    parser.add_argument(
        "--temperature", type=float, help="sampling temperature (default: smollm2 0.7, tiny 1.0)"
    )
    parser.add_argument(
        "--eval-max-tokens", type=int, help="held-out token cap (default --max-tokens)"
    )
    parser.add_argument("--eval-rows", type=int, help="held-out rows scored")
    parser.add_argument("--eval-every", type=int, help="score the held-out rows every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 steps, 16 held-out rows")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/learning"), help="output directory"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if not arms or any(a not in ARMS for a in arms):
        print(f"--arms: {args.arms!r}; allowed: {', '.join(ARMS)}")
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    task = TASKS[args.model]
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir, train, held_out = task_files(task)
    numbers = dict(DEFAULTS[task.name], **(QUICK if args.quick else {}))
    for key in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "learning_rate",
                "kl_coef", "eval_rows", "eval_every", "temperature",
                "eval_max_tokens"):  # fmt: skip
        if getattr(args, key) is not None:
            numbers[key] = getattr(args, key)
    eval_path = out / "data" / "eval-used.jsonl"
    eval_path.parent.mkdir(parents=True, exist_ok=True)
    lines = held_out.read_text(encoding="utf-8").splitlines()[: int(numbers["eval_rows"])]
    eval_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    example = yaml.safe_load(task.manifest.read_text(encoding="utf-8"))
    micro = int(example["spec"]["algorithm"].get("microBatchSize", 8))  # the example's bound
    setup = GrpoSetup(
        model_dir, train, eval_path, seed=args.seed, micro_batch_size=micro, **numbers
    )
    rows = read_eval_rows(eval_path)
    before = evaluate_dir(model_dir, model_dir, rows, setup, task.rule)
    print(f"[learning] initial weights: held-out accuracy {before:.3f} ({len(rows)} rows)")
    results: dict[str, ArmResult] = {}
    for arm in arms:
        if arm == "trl":
            from rlhfspec_workers.benchmarks.trl_reference import run_trl

            result = run_trl(setup, out, scorer=task.rule, before=before)
        else:
            result = run_job_arm(task, setup, arm, out)
            result.before = before
            result.after = evaluate_dir(final_policy(out / arm), model_dir, rows, setup, task.rule)
        results[arm] = result
        doc = {"model": task.name, "setup": {k: str(v) if isinstance(v, Path) else v
                                             for k, v in asdict(setup).items()},
               "arms": {k: r.to_json() for k, r in results.items()}}  # fmt: skip
        (out / "learning.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(summary_lines(results, setup)))
    plot(results, out / "learning.png")
    print(f"[learning] wrote {out / 'learning.json'} and {out / 'learning.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
