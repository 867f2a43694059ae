"""`rlhfspec run` (the README's main command): bad input stops early; a tiny job runs for real."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from rlhfspec_workers.messages import IterationMetrics
from rlhfspec_workers.observability.plots import by_worker, timeline

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def write_job(tmp_path: Path, **generation: object) -> Path:
    job = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    job["spec"]["algorithm"].update(
        iterations=1, promptsPerIteration=4, samplesPerPrompt=2, microBatchSize=8
    )
    job["spec"]["generation"].update(maxNewTokens=24, **generation)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_invalid_manifest_names_the_field_and_starts_nothing(tmp_path: Path) -> None:
    path = write_job(tmp_path, replicas=0)
    result = run(str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert f"{path}: spec.generation.replicas: 0 is out of range" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_dataset_field_is_caught_before_anything_starts(tmp_path: Path) -> None:
    path = write_job(tmp_path)
    job = yaml.safe_load(path.read_text())
    job["spec"]["dataset"]["promptField"] = "question"
    path.write_text(yaml.safe_dump(job))
    result = run(str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "spec.dataset.promptField:" in result.stderr
    assert "row has no field 'question'" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture
def relative_run_dir(tmp_path: Path) -> Iterator[str]:
    """A run dir given relative to the repository root, as the README's main command's
    default ``runs/<job name>`` is (redis-server once failed on relative paths)."""
    relative = f"runs/pytest-{tmp_path.name}"
    yield relative
    shutil.rmtree(ROOT / relative, ignore_errors=True)


@pytest.mark.engine
def test_tiny_job_generates_scores_and_records_metrics(
    tiny_kit: Path, tmp_path: Path, relative_run_dir: str
) -> None:
    path = write_job(tmp_path)
    job = yaml.safe_load(path.read_text())
    job["spec"]["dataset"].update(evalFraction=0.02, evalMaxTokens=16)
    path.write_text(yaml.safe_dump(job))
    result = run(str(path), "--run-dir", relative_run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = ROOT / relative_run_dir
    assert (run_dir / "redis" / "redis.log").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert len(records) == 1
    record = records[0]
    assert record["samples"] == 8
    assert 0.0 <= record["reward_mean"] <= 1.0
    assert record["tokens"] > 0 and record["tokens_per_second"] > 0
    # Speculation with the trained draft emits more than one token per verification step.
    assert record["mean_accepted_length"] > 1.0
    # The held-out split was scored before training and after the (last) iteration, greedy,
    # and its samples stayed out of the iteration's figures and training.
    assert record["eval_samples"] > 0
    assert 0.0 <= record["eval_accuracy"] <= 1.0
    assert 0.0 <= record["baseline_eval_accuracy"] <= 1.0
    assert f"{record['baseline_eval_accuracy']:.3f}>{record['eval_accuracy']:.3f}" in result.stdout
    # The report's throughput plot is drawn from rows that add up to the table's figures:
    # every worker's tokens so far end at the iteration's tokens, and the plotted rate
    # integrates to them over the stage.
    metrics = IterationMetrics.model_validate(record)
    points, _ = timeline([metrics])
    finals = {p.worker: p for p in points}
    rows = metrics.batch_trace
    assert sum(row[5] for row in rows if row[0] == max(r[0] for r in rows)) == metrics.tokens
    integral = 0.0
    for series in by_worker(points).values():
        for prev, point in itertools.pairwise(series):
            integral += point.tokens_per_second * (point.t - prev.t)
        integral += series[0].tokens_per_second * series[0].t
    assert integral == pytest.approx(metrics.tokens, rel=0.02)
    assert len(finals) == 1


@pytest.mark.engine
def test_tiny_job_runs_vllm_s_own_drafter_at_our_selector_s_k(
    tiny_kit: Path, tmp_path: Path
) -> None:
    """``selector.execution: native``: the generation worker builds vLLM's own draft-model
    path, calibrates its whole steps, and our selector sets k per batch size; the iteration
    completes with drafts accepted."""
    speculative = {
        "mode": "adaptive",
        "maxDraftTokens": 4,
        "selector": {"execution": "native"},
        "drafters": [{"method": "draft_model", "model": {"path": "tiny://draft"}}],
    }
    path = write_job(tmp_path, speculative=speculative)
    result = run(str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(records) == 1 and records[0]["samples"] == 8
    assert records[0]["mean_accepted_length"] > 1.0
    assert any(name.startswith("draft_model:") for name in records[0]["strategies"])
