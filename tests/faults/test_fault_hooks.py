"""The fault hooks themselves (no engine): the variable's grammar, refusal at start, placement,
a real SIGKILL that fires once per job storage, a hold that waits for its release once per job
storage, and the trainer's record and temp-dir cleanup."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhfspec_workers.faults import (
    FAULT_POINTS,
    HOLD_ENV_VAR,
    FaultSpec,
    FaultSpecError,
    arm_from_environ,
    fault_point,
    hold_markers,
    parse_fault,
)
from rlhfspec_workers.messages import Experience, Rollout
from rlhfspec_workers.trainer.trained_record import read_trained_record, write_trained_record
from rlhfspec_workers.trainer.worker import remove_partial_exports

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ROOT / "workers" / "rlhfspec_workers"


def test_parse_fault_reads_worker_point_and_nth() -> None:
    assert parse_fault("trainer:mid_weight_write") == FaultSpec("trainer", "mid_weight_write", 1)
    spec = parse_fault("generation-1:after_publish_rollouts:3")
    assert spec == FaultSpec("generation-1", "after_publish_rollouts", 3)
    assert spec.applies_to("generation", "generation-1")
    assert not spec.applies_to("generation", "generation-0")
    whole_role = parse_fault("generation:before_publish_rollouts")
    assert whole_role.applies_to("generation", "generation-0")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("trainer:no_such_hook", "no fault hook 'no_such_hook'"),
        ("trainer", "expected <worker>:<point>[:<nth>]"),
        ("trainer:mid_weight_write:1:2", "expected <worker>:<point>[:<nth>]"),
        ("operator:mid_weight_write", "worker 'operator' unknown"),
        ("trainer:mid_weight_write:0", "nth '0' is not allowed (a positive integer)"),
        ("trainer:mid_weight_write:x", "nth 'x' is not allowed (a positive integer)"),
    ],
)
def test_bad_fault_variable_is_refused_naming_the_part(value: str, says: str) -> None:
    with pytest.raises(FaultSpecError) as raised:
        parse_fault(value)
    assert says in str(raised.value)
    assert "RLHFSPEC_FAULT" in str(raised.value)
    with pytest.raises(FaultSpecError) as raised:
        arm_from_environ("trainer", "trainer-0", Path("/nonexistent"), {HOLD_ENV_VAR: value})
    assert says in str(raised.value)
    assert f"{HOLD_ENV_VAR}={value!r}" in str(raised.value)


def test_every_hook_is_placed_exactly_once_and_every_placed_hook_is_known() -> None:
    placed: dict[str, list[str]] = {}
    for path in WORKERS.rglob("*.py"):
        for name in re.findall(r'fault_point\("([a-z_]+)"\)', path.read_text()):
            placed.setdefault(name, []).append(str(path.relative_to(WORKERS)))
    assert set(placed) == set(FAULT_POINTS), (sorted(placed), sorted(FAULT_POINTS))
    assert all(len(where) == 1 for where in placed.values()), placed


def _worker_env(tmp_path: Path, fault: str, variable: str = "RLHFSPEC_FAULT") -> dict[str, str]:
    return {
        **os.environ,
        "RLHFSPEC_JOB": "job",
        "RLHFSPEC_REDIS_URL": "redis://127.0.0.1:1/0",
        "RLHFSPEC_JOB_CONFIG": str(tmp_path / "job.yaml"),
        "RLHFSPEC_STORAGE": str(tmp_path),
        variable: fault,
    }


@pytest.mark.parametrize("variable", ["RLHFSPEC_FAULT", HOLD_ENV_VAR])
def test_worker_refuses_an_unknown_hook_at_start_with_the_list(
    tmp_path: Path, variable: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", "worker", "trainer"],
        env=_worker_env(tmp_path, "trainer:mid_wieght_write", variable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert f"{variable}='trainer:mid_wieght_write': no fault hook 'mid_wieght_write'" in (
        result.stderr
    )
    for hook in FAULT_POINTS:
        assert hook in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("variable", ["RLHFSPEC_FAULT", HOLD_ENV_VAR])
def test_local_run_refuses_an_unknown_hook_before_starting_anything(
    tmp_path: Path, variable: str
) -> None:
    job = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", "run", str(manifest), "--run-dir", str(run_dir)],
        env={**os.environ, variable: "inference:nowhere"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 1, result.stderr
    assert f"{variable}='inference:nowhere': no fault hook 'nowhere'" in result.stderr
    assert "before_publish_experiences" in result.stderr
    assert not run_dir.exists()


PROGRAM = """
import sys
from pathlib import Path
from rlhfspec_workers.faults import arm_from_environ, fault_point
armed = arm_from_environ("trainer", "trainer-0", Path(sys.argv[1]))
print("armed" if armed else "disarmed", flush=True)
for n in range(1, 4):
    print(f"reached {n}", flush=True)
    fault_point("mid_weight_write")
print("survived", flush=True)
"""


def test_fault_kills_for_real_at_the_nth_time_and_only_once_per_storage(tmp_path: Path) -> None:
    def once() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", PROGRAM, str(tmp_path)],
            env={**os.environ, "RLHFSPEC_FAULT": "trainer:mid_weight_write:2"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = once()
    assert first.returncode == -signal.SIGKILL
    assert first.stdout.splitlines()[:3] == ["armed", "reached 1", "reached 2"]
    assert "survived" not in first.stdout
    assert (tmp_path / "faults" / "trainer-0.mid_weight_write.2.fired").is_file()
    second = once()  # the restart: same environment, same storage
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [
        "disarmed",
        "reached 1",
        "reached 2",
        "reached 3",
        "survived",
    ]


HOLD_PROGRAM = """
import sys
from pathlib import Path
from rlhfspec_workers.faults import arm_from_environ, fault_point
armed = arm_from_environ("generation", "generation-0", Path(sys.argv[1]))
print("kill armed" if armed else "no kill armed", flush=True)
for n in range(1, 4):
    print(f"reached {n}", flush=True)
    fault_point("after_engine_step")
print("survived", flush=True)
"""


def test_hold_waits_for_its_release_at_the_nth_time_and_only_once_per_storage(
    tmp_path: Path,
) -> None:
    value = "generation-0:after_engine_step:2"
    held, release = hold_markers(tmp_path, "generation-0", parse_fault(value))
    assert release.name == "generation-0.after_engine_step.2.release"

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", HOLD_PROGRAM, str(tmp_path)],
            env={**os.environ, HOLD_ENV_VAR: value},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = start()
    deadline = time.monotonic() + 60
    while not held.exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "never held"
        time.sleep(0.01)
    time.sleep(0.5)
    assert first.poll() is None  # still waiting: it got no further than the hold
    release.touch()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    lines = out.splitlines()
    assert lines[:3] == ["no kill armed", "reached 1", "reached 2"]
    assert lines[3].startswith("[rlhfspec] fault hold at after_engine_step (time 2) until ")
    assert lines[4:] == [
        "[rlhfspec] fault hold at after_engine_step: released",
        "reached 3",
        "survived",
    ]
    release.unlink()
    second = start()  # the restart: same environment, same storage, nobody to release it
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert out.splitlines() == ["no kill armed", "reached 1", "reached 2", "reached 3", "survived"]


def test_a_hold_and_a_kill_arm_side_by_side(tmp_path: Path) -> None:
    environ = {
        HOLD_ENV_VAR: "generation-0:after_engine_step:3",
        "RLHFSPEC_FAULT": "generation-1:before_import_kv",
    }
    held, release = hold_markers(tmp_path, "generation-0", parse_fault(environ[HOLD_ENV_VAR]))
    release.parent.mkdir()
    release.touch()  # released before it holds: it goes straight on
    assert arm_from_environ("generation", "generation-0", tmp_path, environ) is None  # no kill
    for _ in range(3):
        fault_point("after_engine_step")
    assert held.exists()
    killed = arm_from_environ("generation", "generation-1", tmp_path, environ)
    assert killed == FaultSpec("generation-1", "before_import_kv", 1)
    arm_from_environ("trainer", "trainer-0", tmp_path, {})  # disarm this test process again


def test_a_fault_for_another_worker_does_not_arm(tmp_path: Path) -> None:
    from rlhfspec_workers.faults import arm_from_environ

    environ = {"RLHFSPEC_FAULT": "generation-1:after_publish_rollouts"}
    assert arm_from_environ("generation", "generation-0", tmp_path, environ) is None
    assert arm_from_environ("generation", "generation-1", tmp_path, environ) is not None
    arm_from_environ("trainer", "trainer-0", tmp_path, {})  # disarm this test process again


def _experience(sample_id: str, reward: float) -> Experience:
    rollout = Rollout(
        iteration=2,
        sample_id=sample_id,
        prompt_id="p0",
        group_id="row1",
        sample_index=0,
        prompt="1 3 2",
        prompt_token_ids=[5, 6],
        token_ids=[7, 8, 9],
        logprobs=[-0.5, -0.25, -1.0],
        text="1 2 3",
        finish_reason="stop",
        weight_version=1,
        worker="generation-0",
    )
    return Experience(rollout=rollout, reward=reward, ref_logprobs=[-0.5, -0.5, -0.5])


def test_trained_record_lists_each_sample_once_sorted_and_replaces_itself(tmp_path: Path) -> None:
    write_trained_record(tmp_path, 2, [_experience("it2/p1/0", 0.0)])
    path = write_trained_record(
        tmp_path, 2, [_experience("it2/p1/0", 1.0), _experience("it2/p0/0", 0.5)]
    )
    assert path == tmp_path / "trained" / "iter-000002.jsonl"
    lines = read_trained_record(tmp_path, 2)
    assert [line["sample_id"] for line in lines] == ["it2/p0/0", "it2/p1/0"]
    assert lines[1]["reward"] == 1.0
    assert lines[0]["logprob_sum"] == -1.75 and lines[0]["ref_logprob_sum"] == -1.5
    assert lines[0]["response_tokens"] == 3 and lines[0]["weight_version"] == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    json.loads(path.read_text().splitlines()[0])


def test_trainer_restart_removes_partial_exports_and_keeps_complete_ones(tmp_path: Path) -> None:
    for name in ("v1", ".v2.tmp-abc123", ".v1.old-77-123"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    removed = remove_partial_exports(tmp_path)
    assert sorted(p.name for p in removed) == [".v1.old-77-123", ".v2.tmp-abc123"]
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]
