"""A reward that cannot score fails the job, naming the field and the error, and loses nothing:
the inference worker writes a JobFailure and leaves its batch pending, the coordinator fails the
job's progress with the reason and exits 1, and (engine) ``rlhfspec run`` prints the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import yaml

from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_api.rewards import RewardSpec, RewardType
from rlhfspec_workers.inference.worker import InferenceWorker
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import FIELD, JobFailure, JobProgress, Keys, Rollout
from rlhfspec_workers.preflight import ResolvedPaths
from rlhfspec_workers.rewards.registry import build_reward
from rlhfspec_workers.runtime import Bus, WorkerEnv

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
BOOM = textwrap.dedent(
    """
    def score(prompts, responses, answers, metadata):
        return [len(r) / metadata[i]["difficulty"] for i, r in enumerate(responses)]
    """
)
REASON = "boom_rewards:score raised KeyError: 'difficulty'"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", password="secret") as srv:
        yield srv


@pytest.fixture
def boom_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "boom_rewards.py").write_text(BOOM)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    yield
    sys.modules.pop("boom_rewards", None)


def _bus(server: RedisServer, role: str, storage: Path) -> Bus:
    env = WorkerEnv.from_environ(
        role,
        {
            "RLHFSPEC_JOB": "job",
            "RLHFSPEC_NAMESPACE": "ns",
            "RLHFSPEC_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
            "RLHFSPEC_REDIS_PASSWORD": "secret",
            "RLHFSPEC_JOB_CONFIG": "/nonexistent/job.yaml",
            "RLHFSPEC_STORAGE": str(storage),
        },
    )
    return Bus(env)


def _rollout(i: int) -> Rollout:
    return Rollout(
        iteration=1, sample_id=f"it1/p{i}/0", prompt_id=f"p{i}", group_id=f"g{i}",
        sample_index=0, prompt="S21=", answer="12", prompt_token_ids=[1], token_ids=[2],
        logprobs=[-0.1], text="12", finish_reason="stop", weight_version=0, worker="gen-0",
    )  # fmt: skip


def test_the_inference_worker_reports_the_failure_and_keeps_its_batch_pending(
    server: RedisServer, boom_module: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = parse_rlhfjob(EXAMPLE)
    bus = _bus(server, "inference", tmp_path)
    keys = bus.keys
    bus.ensure_group(keys.rollouts, Keys.INFERENCE_GROUP)
    for i in range(3):
        bus.publish(keys.rollouts, _rollout(i))
    reward = build_reward(
        [("spec.rewards[1]", RewardSpec(type=RewardType.FUNCTION, function="boom_rewards:score"))],
        {},
    )
    maker = SimpleNamespace(make=reward, score=reward)  # the reward is what fails
    assert InferenceWorker(job, bus, maker).run() == 1  # type: ignore[arg-type]
    failure = JobFailure.from_bytes(bus.redis.get(keys.failure))
    assert (failure.field, failure.reason) == ("spec.rewards[1].function", REASON)
    assert failure.worker == "inference-0" and failure.iteration == 1
    # Nothing scored, nothing acked: the batch waits in the group's pending list for a resume.
    assert bus.redis.xpending(keys.rollouts, Keys.INFERENCE_GROUP)["pending"] == 3
    assert bus.redis.xlen(keys.experience) == 0
    assert bus.redis.scard(keys.scored_samples(1)) == 0
    err = capsys.readouterr().err
    assert "KeyError: 'difficulty'" in err  # the user's traceback, for the log
    assert err.rstrip().endswith(f"reward failed: spec.rewards[1].function: {REASON}")


def test_the_coordinator_fails_the_job_with_the_reported_reason(
    server: RedisServer, tmp_path: Path
) -> None:
    from rlhfspec_workers.coordinator import loop

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"S{i}1=", "answer": "1"}) + "\n"
                            for i in range(4)))  # fmt: skip
    job = parse_rlhfjob(EXAMPLE)
    bus = _bus(server, "coordinator", tmp_path)
    keys = bus.keys
    bus.redis.set(keys.failure, JobFailure(worker="old", field="f", reason="stale").to_bytes())
    outcome: list[int] = []
    thread = threading.Thread(
        target=lambda: outcome.append(loop.run(job, ResolvedPaths({}, data), bus)), daemon=True
    )
    thread.start()
    time.sleep(1.0)  # waiting for workers that never come; the stale failure was cleared
    assert thread.is_alive()
    failure = JobFailure(worker="inference-0", field="spec.reward.function", reason=REASON)
    bus.redis.set(keys.failure, failure.to_bytes())
    thread.join(timeout=10)
    assert outcome == [1]
    progress = JobProgress.from_bytes(bus.redis.get(keys.progress))
    assert progress.state == "failed"
    assert progress.message == f"spec.reward.function: {REASON} (reported by inference-0)"
    assert bus.redis.exists(keys.stop)


@pytest.mark.engine
def test_rlhfspec_run_fails_with_the_reason_and_keeps_the_rollouts(
    tiny_kit: Path, tmp_path: Path
) -> None:
    """The function lives in the directory the user runs from, as the console script sees it
    (no current directory on its sys.path, unlike ``python -m``)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "boom_rewards.py").write_text(BOOM)
    doc = json.loads(json.dumps(EXAMPLE))
    doc["spec"]["algorithm"].update(iterations=1, promptsPerIteration=4, samplesPerPrompt=2,
                                    microBatchSize=8)  # fmt: skip
    doc["spec"]["generation"].update(maxNewTokens=24)
    doc["spec"]["reward"] = {"type": "function", "function": "boom_rewards:score"}
    (work / "job.yaml").write_text(yaml.safe_dump(doc))
    run_dir = tmp_path / "run"
    script = Path(sys.executable).parent / "rlhfspec"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rlhfspec_cli"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([*command, "run", "job.yaml", "--run-dir", str(run_dir)], cwd=work,
                            env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    first = next(line for line in result.stderr.splitlines() if "failed" in line)
    assert first == (
        f"[rlhfspec] tiny-grpo failed: spec.reward.function: {REASON} (reported by inference-0)"
    ), result.stderr[-3000:]
    # Then which processes exited and the tails of their logs (the inference worker's, or the
    # coordinator's if it was quicker to exit).
    assert "exited with 1; last lines of its log" in result.stderr
    # Redis kept everything (append-only file): the rollouts wait for the inference group.
    password = (run_dir / "redis" / "password").read_text().strip()
    with RedisServer(run_dir / "redis", password=password) as srv:
        client = redis.Redis(host="127.0.0.1", port=srv.port, password=password)
        keys = Keys("default", "tiny-grpo")
        assert client.xlen(keys.rollouts) >= 1
        assert client.xpending(keys.rollouts, Keys.INFERENCE_GROUP)["pending"] >= 1
        assert client.xlen(keys.experience) == 0
        progress = JobProgress.from_bytes(client.get(keys.progress))
        assert progress.state == "failed" and REASON in progress.message
        generated = _sample_ids(client, keys.rollouts)
        client.close()
    # The user fixes the function and resumes: the kept rollouts are scored, none is generated
    # a second time, and the iteration trains on every sample.
    (work / "boom_rewards.py").write_text(FIXED)
    resumed = subprocess.run(
        [*command, "run", "job.yaml", "--run-dir", str(run_dir), "--resume"], cwd=work, env=env,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [(r["iteration"], r["samples"]) for r in records] == [(1, 8)]
    with RedisServer(run_dir / "redis", password=password) as srv:
        client = redis.Redis(host="127.0.0.1", port=srv.port, password=password)
        rollouts = _sample_ids(client, keys.rollouts)
        assert all(rollouts.count(sample) == 1 for sample in generated), rollouts
        assert sorted(set(rollouts)) == sorted(rollouts) and len(rollouts) == 8
        assert sorted(_sample_ids(client, keys.experience)) == sorted(rollouts)
        client.close()


FIXED = textwrap.dedent(
    """
    def score(prompts, responses, answers, metadata):
        return [float(len(r) > 0) for r in responses]
    """
)


def _sample_ids(client: redis.Redis, stream: str) -> list[str]:
    """The sample id of every entry of a rollout or experience stream, in order."""
    out = []
    for _, fields in client.xrange(stream):
        doc = json.loads(fields[FIELD])
        out.append(str(doc.get("sample_id") or doc["rollout"]["sample_id"]))
    return out
