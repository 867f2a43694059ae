"""Training teaches: a GRPO job raises held-out accuracy above a shuffled-reward control.

Both runs are `rlhfspec run` on the tiny kit's sort-digits task (the policy, rows and held-out
split of the session's ``tiny_kit``), with the same seeds, sizes and evaluation; the control's
reward is the same rule with its scores permuted across each batch
(``benchmarks.learning:shuffled_sort_digits``, a function reward), so both see rewards of the
same level but only one sees which response earned them. Accuracy is the job's own greedy
held-out eval (``baseline_eval_accuracy`` / ``eval_accuracy`` in metrics.jsonl).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhfspec_workers.benchmarks.learning import SHUFFLE_SEED_ENV, TASKS, job_manifest
from rlhfspec_workers.benchmarks.trl_reference import GrpoSetup

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
EVAL_ROWS = 256
# Held-out accuracy the trained job must hold over the shuffled control at the end, in
# absolute accuracy, set from controls measured on this setup (these sizes, seeds 0, greedy):
# - 2-core AVX2 CPU, 2026-12-03, three repeats of both runs: both start at 0.691 (256 rows);
#   after 12 iterations the job is at 0.754, 0.762, 0.742 and the control at 0.422, 0.453,
#   0.391: gaps 0.31-0.35.
# - 2-core AVX-512 bf16 CPU, 2026-12-04: both start at 0.633; run alone, twice, the job ends
#   at 0.750 and the control at 0.484 and 0.457 (gaps 0.27, 0.29); inside the full suite on a
#   loaded machine, the job at 0.699 and the control at 0.586 (gap 0.11). Timing changes the
#   batches the engines step, so each run samples other rollouts and the control's drift
#   varies most.
# The margin is about half the smallest gap measured. Shorter runs are too close to call: after 8
# iterations (128 rows) the gaps were 0.17, 0.05, 0.23 and the job had not yet risen above
# its start (0.66-0.72 from 0.68).
MARGIN = 0.05


def _start(manifest: dict[str, Any], tmp_path: Path, arm: str) -> subprocess.Popen[str]:
    path = tmp_path / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    env = dict(os.environ, **{SHUFFLE_SEED_ENV: "0"})
    command = [sys.executable, "-m", "rlhfspec_cli", "run", str(path), "--run-dir",
               str(tmp_path / arm)]  # fmt: skip
    log = (tmp_path / f"{arm}.out").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=env)  # fmt: skip


def _finish(process: subprocess.Popen[str], tmp_path: Path, arm: str) -> list[dict[str, Any]]:
    try:
        code = process.wait(timeout=900)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
    assert code == 0, (tmp_path / f"{arm}.out").read_text()[-4000:]
    return [json.loads(line) for line in (tmp_path / arm / "metrics.jsonl").open()]


@pytest.mark.engine
@pytest.mark.slow
def test_grpo_beats_a_shuffled_reward_control_on_held_out_rows(
    tiny_kit: Path, tmp_path: Path
) -> None:
    held_out = tmp_path / "eval.jsonl"
    lines = (tiny_kit / "dataset" / "eval.jsonl").read_text().splitlines()[:EVAL_ROWS]
    held_out.write_text("\n".join(lines) + "\n")
    setup = GrpoSetup(
        model_dir=tiny_kit / "policy",
        train_path=tiny_kit / "dataset" / "train.jsonl",
        eval_path=held_out,
        steps=STEPS,
        prompts_per_step=16,
        group_size=8,
        max_new_tokens=48,
        learning_rate=5e-5,
        eval_every=STEPS,
        eval_rows=EVAL_ROWS,
    )
    task = TASKS["tiny"]
    # Both runs at once: each mostly waits on its own stages, so together they take ~2/3 of
    # the time one after the other would.
    arms = ("job", "shuffled")
    started = {arm: _start(job_manifest(task, setup, arm), tmp_path, arm) for arm in arms}
    runs = {arm: _finish(process, tmp_path, arm) for arm, process in started.items()}
    baselines = {arm: records[0]["baseline_eval_accuracy"] for arm, records in runs.items()}
    finals = {arm: records[-1]["eval_accuracy"] for arm, records in runs.items()}
    for arm, records in runs.items():
        assert [r["iteration"] for r in records] == list(range(1, STEPS + 1)), arm
        assert records[-1]["eval_samples"] == EVAL_ROWS, arm
    # Same initial weights, same rows, greedy: both runs measure the same starting point.
    assert baselines["job"] == baselines["shuffled"]
    # At 12 iterations training raised accuracy in every measured run (+0.05 to +0.12).
    assert finals["job"] > baselines["job"], (baselines, finals)
    assert finals["job"] - finals["shuffled"] >= MARGIN, (baselines, finals)


# -- the benchmark's pieces the test relies on (fast, no models) ---------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_arm_manifests_are_valid_jobs_that_differ_only_in_the_reward(
    name: str, tmp_path: Path
) -> None:
    from rlhfspec_api.manifest import parse_rlhfjob

    setup = GrpoSetup(tmp_path, tmp_path / "t.jsonl", tmp_path / "e.jsonl", steps=3)
    jobs = {arm: job_manifest(TASKS[name], setup, arm) for arm in ("rlhfspec", "shuffled")}
    specs = {arm: parse_rlhfjob(job).spec for arm, job in jobs.items()}
    assert specs["rlhfspec"].reward is not None and specs["shuffled"].reward is not None
    assert specs["rlhfspec"].reward.rule == TASKS[name].rule
    assert specs["shuffled"].reward.function == TASKS[name].shuffled
    for spec in specs.values():
        assert spec.algorithm.iterations == 3
        assert spec.dataset.eval == str(tmp_path / "e.jsonl")
        assert spec.generation.temperature == 1.0
    del jobs["rlhfspec"]["spec"]["reward"], jobs["shuffled"]["spec"]["reward"]
    del jobs["rlhfspec"]["metadata"]["name"], jobs["shuffled"]["metadata"]["name"]
    assert jobs["rlhfspec"] == jobs["shuffled"]


def test_shuffled_control_keeps_the_scores_but_not_which_response_earned_them() -> None:
    from rlhfspec_workers.benchmarks import learning

    answers = [f"#### {i}" for i in range(40)]
    right = [f"so the answer is {i}" for i in range(40)]
    finished = [{"finish_reason": "stop"}] * 40
    scores = learning.shuffled_math_answer(["q"] * 40, right, answers, finished)
    assert sorted(scores) == [1.0] * 40
    half = right[:20] + ["no idea"] * 20
    scores = learning.shuffled_math_answer(["q"] * 40, half, answers, finished)
    assert sum(scores) == 20 and scores != [1.0] * 20 + [0.0] * 20
    cut = [{"finish_reason": "length"}] * 40
    assert learning.shuffled_math_answer(["q"] * 40, right, answers, cut) == [0.0] * 40
    digits = learning.shuffled_sort_digits(
        ["S321=", "S21="], ["123", "21"], [None] * 2, finished[:2]
    )
    assert sorted(digits) == [0.0, 1.0]
