"""The inference worker: Rollouts in, Experiences (reward, reference log-probs, values) out.

Where it sits: ``rlhfspec worker inference``, between generation and the trainer. It reads
the rollout stream through the ``inference`` consumer group while generation is still running
(the long tail's early finishers are scored while the tail decodes), batches up to
``spec.inference.batchSize``, scores with :class:`ExperienceMaker`, publishes one Experience
per rollout, marks the sample scored (idempotency: a duplicate rollout is acked and skipped)
and acks. Entries it was given before a crash are re-read from its pending list on restart.
A reward that cannot score (``rewards.RewardError``) stops it: it writes a JobFailure naming
the field for the coordinator (which fails the job), leaves the batch unacked (pending, so a
fixed job resumes from it) and exits 1.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any

from rlhfspec_api.manifest import RLHFJob
from rlhfspec_workers.faults import fault_point
from rlhfspec_workers.messages import EvalScore, JobFailure, Keys, Rollout, WorkerStatus
from rlhfspec_workers.preflight import ResolvedPaths
from rlhfspec_workers.rewards import RewardError
from rlhfspec_workers.runtime import Bus, StreamEntry

from .experience import ExperienceMaker

GATHER_SECONDS = 0.2
"""How long a partial batch waits for more rollouts before it is scored anyway."""


class InferenceWorker:
    def __init__(self, job: RLHFJob, bus: Bus, maker: ExperienceMaker) -> None:
        self.bus = bus
        self.keys: Keys = bus.keys
        self.maker = maker
        self.batch_size = job.spec.inference.batch_size
        self.scored = 0

    def run(self) -> int:
        bus, keys = self.bus, self.keys
        bus.ensure_group(keys.rollouts, Keys.INFERENCE_GROUP)
        backlog = bus.read_group(
            keys.rollouts, Keys.INFERENCE_GROUP, Rollout, count=100_000, block_ms=0, pending=True
        )
        while not bus.stop_requested():
            self._beat("ready")
            batch = backlog[: self.batch_size]
            backlog = backlog[self.batch_size :]
            deadline = time.monotonic() + GATHER_SECONDS
            while len(batch) < self.batch_size:
                wait_ms = 500 if not batch else max(1, int((deadline - time.monotonic()) * 1000))
                got = bus.read_group(
                    keys.rollouts,
                    Keys.INFERENCE_GROUP,
                    Rollout,
                    count=self.batch_size - len(batch),
                    block_ms=wait_ms,
                )
                batch.extend(got)
                if not got or time.monotonic() >= deadline:
                    break
            if batch:
                self._beat("busy")
                try:
                    self._score(batch)
                except RewardError as exc:
                    return report_failure(bus, exc, batch[0][1].iteration)
        self._beat("stopping")
        return 0

    def _score(self, batch: list[StreamEntry[Rollout]]) -> None:
        bus, keys = self.bus, self.keys
        held_out = [entry for entry in batch if entry.message.eval]
        if held_out:
            self._score_eval(held_out)
            batch = [entry for entry in batch if not entry.message.eval]

        # One round trip per batch, not per sample: the scored check, then one transaction
        # that publishes every experience, marks it scored and acks its rollout.
        def check(pipe: Any) -> None:
            for _, r in batch:
                pipe.sismember(keys.scored_samples(r.iteration), r.sample_id)

        seen = bus.pipelined("check scored", check) if batch else []
        fresh: list[StreamEntry[Rollout]] = []
        duplicates: list[str] = []
        fresh_ids: set[str] = set()
        for (entry_id, rollout), was_scored in zip(batch, seen, strict=True):
            if was_scored or rollout.sample_id in fresh_ids:
                duplicates.append(entry_id)
            else:
                fresh.append(StreamEntry(entry_id, rollout))
                fresh_ids.add(rollout.sample_id)
        bus.ack(keys.rollouts, Keys.INFERENCE_GROUP, *duplicates)
        if not fresh:
            return
        experiences = self.maker.make([r for _, r in fresh])

        def publish(pipe: Any) -> None:
            for (entry_id, rollout), experience in zip(fresh, experiences, strict=True):
                bus.queue_publish(pipe, keys.experience, experience)
                pipe.sadd(keys.scored_samples(rollout.iteration), rollout.sample_id)
                pipe.xack(keys.rollouts, Keys.INFERENCE_GROUP, entry_id)

        fault_point("before_publish_experiences")
        bus.pipelined("publish experiences", publish)
        self.scored += len(fresh)

    def _score_eval(self, batch: list[StreamEntry[Rollout]]) -> None:
        """Held-out samples: the reward only (no reference log-probs, nothing for the
        trainer), into the evaluated version's score hash (HSET: a redelivered sample
        overwrites its own score, so a restart never double-counts)."""
        bus, keys = self.bus, self.keys
        rollouts = [r for _, r in batch]
        rewards = self.maker.score(rollouts)
        scores = [
            EvalScore(
                weight_version=rollout.iteration,
                sample_id=rollout.sample_id,
                reward=float(reward),
                response_tokens=len(rollout.token_ids),
                finish_reason=rollout.finish_reason,
            )
            for (_, rollout), reward in zip(batch, rewards, strict=True)
        ]

        def write(pipe: Any) -> None:
            for (entry_id, _), score in zip(batch, scores, strict=True):
                pipe.hset(keys.eval_scores(score.weight_version), score.sample_id, score.to_bytes())
                pipe.xack(keys.rollouts, Keys.INFERENCE_GROUP, entry_id)

        bus.pipelined("write eval scores", write)
        self.scored += len(batch)

    def _beat(self, state: str) -> None:
        self.bus.heartbeat(
            WorkerStatus(
                worker=self.bus.env.worker,
                role="inference",
                state=state,  # type: ignore[arg-type]
                tokens_generated=self.scored,
            )
        )


def report_failure(bus: Bus, error: RewardError, iteration: int | None = None) -> int:
    """Tell the coordinator the job cannot go on (``Keys.failure``), say why on stderr (the
    user's traceback first, the one-line reason last) and return the exit code, 1."""
    failure = JobFailure(
        worker=bus.env.worker,
        field=error.field,
        reason=error.message,
        iteration=iteration,
        failed_at=time.time(),
    )
    bus.put(bus.keys.failure, failure)
    bus.heartbeat(
        WorkerStatus(worker=bus.env.worker, role="inference", state="degraded", message=str(error))
    )
    if error.__cause__ is not None:
        traceback.print_exception(error.__cause__, file=sys.stderr)
    print(f"[rlhfspec] {bus.env.worker}: reward failed: {error}", file=sys.stderr, flush=True)
    return 1


def run(job: RLHFJob, paths: ResolvedPaths, bus: Bus) -> int:
    try:
        maker = ExperienceMaker(job.spec, paths.models)
    except RewardError as exc:
        return report_failure(bus, exc)
    return InferenceWorker(job, bus, maker).run()
