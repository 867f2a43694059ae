"""``rlhfspec run --resume`` (issue 18, "found by reading"): it was never run by a test, and a
changed manifest silently replaced the run directory's ``job.yaml``.

A resumed run continues the job its run directory holds: a manifest that changes what the job
trains is refused with every changed field (nothing starts); fields that only change how fast
or how long it runs are accepted and listed. A real tiny job killed mid-way and resumed: with
only the supervisor killed (SIGKILL, no chance to stop anything), every process it started
(workers, their children, its redis-server) is gone within seconds; a leftover process of the
run (one started with its storage) makes a resume refuse, naming it; once it is gone the job
continues from its last checkpoint and ends with every iteration trained once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from local_jobs import (
    ROOT,
    SAMPLES_PER_ITERATION,
    kill_run,
    redis_pid,
    start_run,
    trained_iterations,
    wait_for,
    worker_pids,
    write_job,
)

from rlhfspec_api.manifest import load_rlhfjob
from rlhfspec_workers.local.resume import ResumeRefused, changed_fields, resume_changes
from rlhfspec_workers.local.run import prepare_run_dir, run_manifest


def _descendants(root: int) -> set[int]:
    """Every live process below ``root`` (children, grandchildren ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _changed_copy(manifest: Path, tmp_path: Path, **algorithm: object) -> Path:
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["algorithm"].update(algorithm)
    doc["spec"]["models"]["policy"]["dtype"] = "float32"
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(doc))
    return changed


def test_changed_fields_are_sorted_paths_with_old_and_new_values() -> None:
    old = {"spec": {"a": {"x": 1, "y": [1, 2]}, "b": 2}}
    new = {"spec": {"a": {"x": 1, "y": [1, 3]}, "c": 3}}
    assert changed_fields(old, new) == [
        ("spec.a.y", [1, 2], [1, 3]),
        ("spec.b", 2, None),
        ("spec.c", None, 3),
    ]


def test_resume_accepts_more_iterations_and_replicas_and_lists_them(tmp_path: Path) -> None:
    job = load_rlhfjob(write_job(tmp_path, iterations=2))
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, job, None, resume=False)
    manifest = run_manifest(job, iterations=5)
    manifest["spec"]["generation"]["replicas"] = 2
    assert resume_changes(run_dir / "job.yaml", manifest) == [
        "  spec.algorithm.iterations: 2 -> 5",
        "  spec.generation.replicas: 1 -> 2",
    ]
    assert resume_changes(run_dir / "job.yaml", run_manifest(job, None)) == []


def test_resume_refuses_a_manifest_that_changes_what_the_job_trains(
    tiny_kit: Path, tmp_path: Path
) -> None:
    original = write_job(tmp_path, iterations=2)
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, load_rlhfjob(original), None, resume=False)
    (run_dir / "redis").mkdir()  # what a previous run leaves
    before = (run_dir / "job.yaml").read_text()
    changed = _changed_copy(original, tmp_path, learningRate=1.0e-4, iterations=3)
    with pytest.raises(ResumeRefused) as refused:
        resume_changes(run_dir / "job.yaml", run_manifest(load_rlhfjob(changed), None))
    assert refused.value.lines[1:3] == [
        "  spec.algorithm.learningRate: 5.0e-05 -> 0.0001",
        "  spec.models.policy.dtype: bfloat16 -> float32",
    ]
    # The command: one error naming every changed field, exit 1, nothing started or rewritten.
    result = subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", "run", str(changed), "--run-dir", str(run_dir),
         "--resume"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--resume: the manifest changes 2 field(s) that change what the job trains" in (
        result.stderr
    )
    assert "spec.algorithm.learningRate: 5.0e-05 -> 0.0001" in result.stderr
    assert "spec.models.policy.dtype: bfloat16 -> float32" in result.stderr
    assert "accepted:\n  spec.algorithm.iterations: 2 -> 3" in result.stderr
    assert (run_dir / "job.yaml").read_text() == before
    assert not (run_dir / "logs").exists() and not (run_dir / "redis" / "redis.conf").exists()


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_resume_after_a_kill_continues_from_the_last_checkpoint(
    tiny_kit: Path, tmp_path: Path
) -> None:
    iterations = 3
    run_dir = tmp_path / "run"
    manifest = write_job(tmp_path, iterations)
    first = start_run(manifest, run_dir)
    resumed = None
    try:
        wait_for(lambda: len(trained_iterations(run_dir)) >= 1, 600, "iteration 1 to train", first)
        # Only the supervisor dies, mid iteration 2. Its workers run in sessions of their own,
        # so nothing else reaches them: their parent-death signal and the run's guard do.
        started = _descendants(first.pid)
        assert set(worker_pids(run_dir)) <= started and redis_pid(run_dir) in started
        assert len(worker_pids(run_dir)) >= 4  # coordinator, generation, inference, trainer
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        killed_at = time.monotonic()
        wait_for(lambda: not any(_alive(p) for p in started), 30, "the run's processes to end")
        print(f"{len(started)} processes gone {time.monotonic() - killed_at:.1f}s after the kill")
        assert not worker_pids(run_dir) and redis_pid(run_dir) is None
        # A process of the run left running anyway (here: one started by hand with the run's
        # storage) would train the same samples a second time: a resume refuses, naming it.
        stray = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            env={**os.environ, "RLHFSPEC_STORAGE": str(run_dir)},
        )
        wait_for(lambda: stray.pid in worker_pids(run_dir), 10, "the stray process to start")
        refused = subprocess.run(
            [sys.executable, "-m", "rlhfspec_cli", "run", str(manifest), "--run-dir",
             str(run_dir), "--resume"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert refused.returncode == 1
        assert "processes of an earlier run are still running" in refused.stderr
        named = refused.stderr.split("(pids ")[1].split(")")[0].split()
        assert [int(pid) for pid in named] == [stray.pid]
        stray.kill()
        stray.wait()
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        last = int(checkpoints[-1].removeprefix("iter-"))
        assert 1 <= last < iterations
        resumed = start_run(manifest, run_dir, "--resume")
        output, _ = resumed.communicate(timeout=600)
        text = output.decode(errors="replace")
        assert resumed.returncode == 0, text[-4000:]
    finally:
        kill_run(first, run_dir)
        if resumed is not None:
            kill_run(resumed, run_dir)
    trainer_log = (run_dir / "logs" / "trainer-0.log").read_text(errors="replace")
    assert f"trainer: resumed from checkpoint {last}" in trainer_log
    # Every iteration trained exactly once, on all its samples, across the two runs.
    assert trained_iterations(run_dir) == [
        (i, SAMPLES_PER_ITERATION) for i in range(1, iterations + 1)
    ]
    recorded = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").open()]
    assert recorded == sorted(set(recorded)) and recorded[-1] == iterations
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == "iter-000003"
