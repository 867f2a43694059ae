"""Disk full is a condition, not a crash loop (issue 18 item 5), on a real small filesystem.

A size-limited tmpfs (mounted here as root) holds the checkpoints: the kernel refuses the write
for real. The trainer's checkpoint fails with StorageFullError naming the path and the bytes
needed and free, the partial checkpoint is gone and the previous one stays the latest and
loads; the trainer reports StorageFull to Redis and retries instead of exiting; the operator
turns the report into the job's StorageFull condition (and clears it); a whole local job
blocked on a full disk, killed and resumed into the same full disk reports it again and
finishes once the filesystem grows, each iteration trained once.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
import yaml
from local_jobs import (
    SAMPLES_PER_ITERATION,
    kill_run,
    mount_tmpfs,
    redis_client,
    resize_tmpfs,
    start_run,
    trained_iterations,
    unmount,
    wait_for,
    write_job,
)

from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_api.status import ConditionStatus, ConditionType, RLHFJobStatus
from rlhfspec_operator.conditions import condition
from rlhfspec_operator.progress import ProgressRead
from rlhfspec_operator.redis_progress import ProgressReader, RedisTarget
from rlhfspec_operator.storage_condition import apply_storage
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import Experience, Keys, Rollout, StorageFull, WorkerStatus
from rlhfspec_workers.runtime import Bus, WorkerEnv
from rlhfspec_workers.trainer.checkpoint import CheckpointStore
from rlhfspec_workers.trainer.policy_trainer import PolicyTrainer
from rlhfspec_workers.trainer.storage import StorageFullError, StorageGuard, tree_bytes
from rlhfspec_workers.trainer.trained_record import (
    read_trained_record,
    record_path,
    write_trained_record,
)

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
ONE_CHECKPOINT_FITS = "75m"
"""A tiny-policy checkpoint with Adam state is ~50.5 MB: one fits, a second does not."""

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "checkpoints"
    mount_tmpfs(path, ONE_CHECKPOINT_FITS)
    try:
        yield path
    finally:
        unmount(path)


def _trainer(kit: Path, iteration: int) -> PolicyTrainer:
    spec = parse_rlhfjob(yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())).spec
    trainer = PolicyTrainer(spec, kit / "policy", device=CPU)
    # One optimizer step, so the checkpoint carries Adam's moments like a trained one.
    sum(p.sum() for p in trainer.policy.parameters()).backward()
    trainer.policy_optimizer.step()
    trainer.iteration = iteration
    return trainer


def test_a_checkpoint_that_does_not_fit_fails_clearly_and_the_previous_one_stays(
    tiny_kit: Path, small_fs: Path
) -> None:
    trainer = _trainer(tiny_kit, iteration=1)
    store = CheckpointStore(small_fs, keep=2)
    store.save(1, trainer)
    first = tree_bytes(store.path(1))
    with pytest.raises(StorageFullError) as caught:
        store.save(2, trainer)
    error = caught.value
    assert error.path == store.path(2)
    assert error.needed_bytes >= first  # the estimate: the previous checkpoint's size
    assert error.free_bytes < error.needed_bytes
    message = str(error)
    assert str(store.path(2)) in message
    assert f"needs about {error.needed_bytes:,} bytes" in message
    assert f"{error.free_bytes:,} free" in message
    # No partial checkpoint (no hidden temp dir either), the previous one is the latest ...
    assert sorted(os.listdir(small_fs)) == ["iter-000001"]
    assert store.latest() == 1
    # ... and loads, weights equal to what was saved.
    fresh = PolicyTrainer(trainer.spec, tiny_kit / "policy", device=CPU)
    assert store.restore(fresh) == 1
    for (name, saved), loaded in zip(
        trainer.policy.state_dict().items(), fresh.policy.state_dict().values(), strict=True
    ):
        assert torch.equal(saved, loaded), name


def test_the_trainer_reports_storage_full_retries_and_clears_it_when_room_appears(
    tiny_kit: Path, small_fs: Path, tmp_path: Path
) -> None:
    trainer = _trainer(tiny_kit, iteration=2)
    store = CheckpointStore(small_fs, keep=2)
    store.save(1, trainer)
    with RedisServer(tmp_path / "redis", password="pw") as server:
        env = WorkerEnv.from_environ(
            "trainer",
            {
                "RLHFSPEC_JOB": "job",
                "RLHFSPEC_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
                "RLHFSPEC_REDIS_PASSWORD": "pw",
                "RLHFSPEC_JOB_CONFIG": "/nonexistent.yaml",
            },
        )
        bus = Bus(env)
        seen: list[StorageFull] = []

        def wait(seconds: float) -> None:
            """The guard's backoff: look at what it reported, then free room on the 2nd."""
            raw = bus.redis.get(bus.keys.storage_full)
            assert raw is not None
            seen.append(StorageFull.from_bytes(raw))
            status = bus.workers()[env.worker]
            assert status.state == "degraded" and "storage full" in status.message
            if len(seen) == 2:
                resize_tmpfs(small_fs, "160m")

        guard = StorageGuard(bus, sleep=wait)
        saved = guard.until_written(lambda: store.save(2, trainer), store.path(2), "checkpoint")
        assert saved == store.path(2) and store.latest() == 2
        assert len(seen) == 2  # refused twice (retried, not exited), then written
        assert seen[0].path == str(store.path(2))
        assert seen[0].needed_bytes >= tree_bytes(store.path(1))
        assert seen[0].free_bytes < seen[0].needed_bytes
        assert seen[0].message.startswith("checkpoint: storage full writing")
        assert bus.redis.get(bus.keys.storage_full) is None  # cleared once written


def test_the_trained_record_waits_for_room_like_a_checkpoint_and_leaves_no_partial_file(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "storage"
    mount_tmpfs(storage, "1m")
    try:
        filler = storage / "filler"
        with filler.open("wb", buffering=0) as f, pytest.raises(OSError):
            while True:  # fill the filesystem for real, to the last byte
                f.write(b"x" * 4096)
        experiences = [_experience(f"it3/p{i}/0") for i in range(64)]
        with RedisServer(tmp_path / "redis", password="pw") as server:
            bus = Bus(_worker_env(server.port))
            refused: list[list[str]] = []

            def wait(seconds: float) -> None:
                refused.append(sorted(p.name for p in (storage / "trained").iterdir()))
                assert bus.redis.get(bus.keys.storage_full) is not None
                filler.unlink()  # room appears

            guard = StorageGuard(bus, sleep=wait)
            path = guard.until_written(
                lambda: write_trained_record(storage, 3, experiences),
                record_path(storage, 3),
                "trained record",
            )
        assert refused == [[]]  # refused once, and no partial record or temp file was left
        assert path == record_path(storage, 3)
        assert len(read_trained_record(storage, 3)) == 64
    finally:
        unmount(storage)


def _worker_env(port: int) -> WorkerEnv:
    return WorkerEnv.from_environ(
        "trainer",
        {
            "RLHFSPEC_JOB": "job",
            "RLHFSPEC_REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "RLHFSPEC_REDIS_PASSWORD": "pw",
            "RLHFSPEC_JOB_CONFIG": "/nonexistent.yaml",
        },
    )


def _experience(sample_id: str) -> Experience:
    rollout = Rollout(
        iteration=3, sample_id=sample_id, prompt_id="p0", group_id="row1", sample_index=0,
        prompt="1 3 2", prompt_token_ids=[5, 6], token_ids=[7, 8, 9],
        logprobs=[-0.5, -0.25, -1.0], text="1 2 3", finish_reason="stop", weight_version=2,
        worker="generation-0",
    )  # fmt: skip
    return Experience(rollout=rollout, reward=1.0, ref_logprobs=[-0.5, -0.5, -0.5])


def test_the_operator_sets_and_clears_the_storage_full_condition_from_redis(
    tmp_path: Path,
) -> None:
    """The operator's real reader against a real redis-server, then the pure condition."""
    report = StorageFull(
        worker="trainer-0", path="/data/checkpoints/iter-000002", needed_bytes=50_513_329,
        free_bytes=24_117_248,
        message="checkpoint: storage full writing /data/checkpoints/iter-000002: needs about "
        "50,513,329 bytes, 24,117,248 free (No space left on device)",
    )  # fmt: skip
    now = datetime.datetime(2026, 12, 4, tzinfo=datetime.UTC)
    status = RLHFJobStatus()
    with RedisServer(tmp_path / "redis", password="pw") as server:
        target = RedisTarget(url=server.url, password="pw")
        keys = Keys("team-a", "job")
        client = redis.Redis.from_url(server.url)
        client.set(keys.storage_full, report.to_bytes())

        async def read() -> ProgressRead:
            reader = ProgressReader()
            try:
                return await reader.read(target, "team-a", "job")
            finally:
                await reader.close()

        read_full = asyncio.run(read())
        assert read_full.storage_full == report
        events = apply_storage(status, read_full, now, 1)
        full = condition(status, ConditionType.STORAGE_FULL)
        assert full is not None and full.status is ConditionStatus.TRUE
        assert full.reason == ConditionType.STORAGE_FULL and full.message == report.message
        assert events == [("Warning", ConditionType.STORAGE_FULL, report.message)]
        assert apply_storage(status, read_full, now, 1) == []  # still full: no new event
        # A failed read says nothing about the disk: the condition stays.
        assert apply_storage(status, ProgressRead(error="down", attempted=True), now, 1) == []
        assert condition(status, ConditionType.STORAGE_FULL).status is ConditionStatus.TRUE  # type: ignore[union-attr]
        client.delete(keys.storage_full)
        read_clear = asyncio.run(read())
        assert read_clear.storage_full is None and read_clear.error is None
        events = apply_storage(status, read_clear, now, 1)
        cleared = condition(status, ConditionType.STORAGE_FULL)
        assert cleared is not None and cleared.status is ConditionStatus.FALSE
        assert [e[1] for e in events] == ["StorageAvailable"]


def _storage_report(run_dir: Path) -> StorageFull | None:
    try:
        raw = redis_client(run_dir).get(Keys("default", "tiny-grpo").storage_full)
    except (OSError, redis.RedisError):  # Redis not started yet, or restarting
        return None
    return None if raw is None else StorageFull.from_bytes(raw)


def _trainer_status(run_dir: Path) -> WorkerStatus:
    raw = redis_client(run_dir).hget(Keys("default", "tiny-grpo").workers, "trainer-0")
    assert raw is not None
    return WorkerStatus.from_bytes(raw)


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_a_job_on_a_full_disk_waits_with_the_condition_survives_a_restart_and_finishes(
    tiny_kit: Path, tmp_path: Path
) -> None:
    iterations = 3
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    mount_tmpfs(checkpoints, ONE_CHECKPOINT_FITS)
    manifest = write_job(tmp_path, iterations)
    job = start_run(manifest, run_dir)
    resumed = None
    try:
        wait_for(lambda: _storage_report(run_dir) is not None, 600, "the StorageFull report", job)
        first = _storage_report(run_dir)
        assert first is not None
        assert first.path == str(checkpoints / "iter-000002")
        assert first.needed_bytes > first.free_bytes
        assert sorted(os.listdir(checkpoints)) == ["iter-000001"]  # no partial, 1 still latest
        time.sleep(5)  # it waits for room; it does not exit and restart
        assert job.poll() is None
        assert _trainer_status(run_dir).state == "degraded"
        assert trained_iterations(run_dir) == [(1, SAMPLES_PER_ITERATION)]

        # The machine dies; the job is resumed into the same full disk.
        kill_run(job, run_dir)
        resumed = start_run(manifest, run_dir, "--resume")
        wait_for(
            lambda: any("storage full" in line for line in _resumed_trainer_log(run_dir)),
            600,
            "the resumed trainer to report StorageFull again",
            resumed,
        )
        again = _storage_report(run_dir)
        assert again is not None and again.reported_at > first.reported_at
        assert again.path == first.path
        assert resumed.poll() is None

        resize_tmpfs(checkpoints, "200m")  # room appears: the job carries on by itself
        output, _ = resumed.communicate(timeout=600)
        text = output.decode(errors="replace")
        assert resumed.returncode == 0, text[-4000:]
    finally:
        kill_run(job, run_dir)
        if resumed is not None:
            kill_run(resumed, run_dir)
        unmount(checkpoints)
    assert "StorageFull: checkpoint: storage full writing" in text
    assert "storage has room again" in text
    assert "storage has room again" in "\n".join(_resumed_trainer_log(run_dir))
    assert trained_iterations(run_dir) == [(i, SAMPLES_PER_ITERATION) for i in (1, 2, 3)]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["iteration"] for r in records] == [1, 2, 3]


def _resumed_trainer_log(run_dir: Path) -> list[str]:
    """The resumed trainer's log lines (it says it resumed from the one checkpoint)."""
    log = run_dir / "logs" / "trainer-0.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    marker = "resumed from checkpoint 1"
    return text.split(marker, 1)[1].splitlines() if marker in text else []
