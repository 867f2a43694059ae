"""The coordinator: drives iterations (prompts -> generation -> inference -> training -> sync).

Where it sits: ``rlhfspec worker coordinator``, one per job (its pod's exit code is the job's
outcome for the operator). Per iteration it publishes the SampleTasks, watches the stages
through Redis (done/scored sets, the generation counters, worker heartbeats) while the
workers stream samples through, waits for the trainer's WeightsPublished for the iteration,
then writes one IterationMetrics record (Redis stream + ``metrics.jsonl`` on job storage) and
the JobProgress the operator copies into the RLHFJob status. Restarted, it resumes after the
last published weights and republishes the same sample ids (every stage deduplicates).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from rlhfspec_api.manifest import RLHFJob
from rlhfspec_workers.messages import (
    IterationMetrics,
    JobProgress,
    Keys,
    WeightsPublished,
    WorkerStatus,
)
from rlhfspec_workers.preflight import ResolvedPaths
from rlhfspec_workers.runtime import Bus

from .reallocate import Reallocator
from .strategy import StrategyBroadcaster
from .tasks import DatasetRow, StageClock, iteration_metrics, iteration_tasks

POLL_SECONDS = 0.25
TRACE_EVERY_SECONDS = 0.5
STALE_WORKER_SECONDS = 120.0


def load_rows(job: RLHFJob, paths: ResolvedPaths) -> list[DatasetRow]:
    dataset = job.spec.dataset
    rows: list[DatasetRow] = []
    with paths.dataset.open(encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            body = json.loads(line)
            answer = body.get(dataset.answer_field) if dataset.answer_field else None
            # A numeric answer (``"answer": 42``) is compared as text by every rule.
            text = None if answer is None else str(answer)
            rows.append(DatasetRow(index, str(body[dataset.prompt_field]), text))
    return rows


class Coordinator:
    def __init__(
        self,
        job: RLHFJob,
        paths: ResolvedPaths,
        bus: Bus,
        *,
        metrics_path: Path | None = None,
        on_metrics: Callable[[IterationMetrics], None] | None = None,
    ) -> None:
        self.job = job
        self.spec = job.spec
        self.bus = bus
        self.keys: Keys = bus.keys
        self.rows = load_rows(job, paths)
        self.total = self.spec.algorithm.iterations
        self.metrics_path = metrics_path
        self.on_metrics = on_metrics
        self.last: IterationMetrics | None = None
        self.reallocator = Reallocator(self.spec, bus, bus.env.replicas)
        self.strategy = StrategyBroadcaster(self.spec, bus)

    def run(self) -> int:
        bus, keys = self.bus, self.keys
        bus.wait_ready()
        bus.call("clear stop", lambda: bus.redis.delete(keys.stop))
        # Groups exist before the first payload, so no consumer misses an entry.
        bus.ensure_group(keys.tasks, Keys.GENERATION_GROUP)
        bus.ensure_group(keys.rollouts, Keys.INFERENCE_GROUP)
        bus.ensure_group(keys.experience, Keys.TRAINER_GROUP)
        latest = bus.get(keys.weights, WeightsPublished)
        start = (latest.iteration + 1) if latest else 1
        if start > self.total:
            self._progress(self.total, "succeeded", "all iterations already trained")
            bus.call("set stop", lambda: bus.redis.set(keys.stop, b"1"))
            return 0
        self._progress(start - 1, "starting", f"starting at iteration {start}")
        self._wait_for_workers(start - 1)
        for iteration in range(start, self.total + 1):
            metrics = self._iteration(iteration)
            self._record(metrics)
        self._progress(self.total, "succeeded", "done")
        bus.call("set stop", lambda: bus.redis.set(keys.stop, b"1"))
        return 0

    def _wait_for_workers(self, done: int) -> None:
        """Stage timings start when every worker has its engine/models loaded."""
        wanted = {f"generation-{i}" for i in range(self.bus.env.replicas)}
        wanted |= {"inference-0", "trainer-0"}
        last_report = time.monotonic()
        while True:
            ready = {
                name
                for name, w in self.bus.workers().items()
                if w.state in ("ready", "busy") and time.time() - w.updated_at < 30
            }
            missing = sorted(wanted - ready)
            if not missing:
                return
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                print(f"[rlhfspec] coordinator: waiting for {', '.join(missing)}", flush=True)
            self._progress(done, "starting", f"waiting for {', '.join(missing)}")
            time.sleep(POLL_SECONDS)

    # -- one iteration ----------------------------------------------------------------------

    def _iteration(self, iteration: int) -> IterationMetrics:
        bus, keys = self.bus, self.keys
        tasks = iteration_tasks(self.spec, self.rows, iteration)
        expected = len(tasks)
        started = time.monotonic()
        published_flag = f"published:{iteration}"
        if not bus.call("read state", lambda: bus.redis.hget(keys.iteration, published_flag)):
            for task in tasks:
                bus.publish(keys.tasks, task)
        bus.call(
            "write state",
            lambda: bus.redis.hset(
                keys.iteration,
                mapping={
                    "iteration": iteration,
                    "samples": expected,
                    published_flag: 1,
                    "started_at": time.time(),
                },
            ),
        )
        self._progress(iteration - 1, "running", f"iteration {iteration}: generating")
        generation_done = inference_done = None
        trace: list[list[float]] = []
        last_trace = 0.0
        while True:
            now = time.monotonic()
            done = int(bus.call("count", lambda: bus.redis.scard(keys.done_samples(iteration))))
            scored = int(bus.call("count", lambda: bus.redis.scard(keys.scored_samples(iteration))))
            if generation_done is None and done >= expected:
                generation_done = now
            if inference_done is None and scored >= expected:
                inference_done = now
                generation_done = generation_done or now
            if generation_done is None:
                self.reallocator.tick(iteration)
                self.strategy.tick()
            if now - last_trace >= TRACE_EVERY_SECONDS:
                last_trace = now
                workers = bus.workers()
                if generation_done is None:
                    trace.extend(self._trace_points(workers, now - started))
                self._progress(
                    iteration - 1,
                    "running",
                    f"iteration {iteration}: generated {done}/{expected}, scored {scored}",
                    workers=workers,
                )
            weights = bus.get(keys.weights, WeightsPublished)
            if weights is not None and weights.iteration >= iteration:
                break
            time.sleep(POLL_SECONDS)
        finished = time.monotonic()
        gen_stats = {
            (k.decode() if isinstance(k, bytes) else str(k)): float(v)
            for k, v in bus.call(
                "read stats", lambda: bus.redis.hgetall(keys.generation_stats(iteration))
            ).items()
        }
        return iteration_metrics(
            iteration=iteration,
            total=self.total,
            gen_stats=gen_stats,
            weights=weights,
            clock=StageClock(
                started=started,
                generation_done=generation_done or finished,
                inference_done=inference_done or finished,
                finished=finished,
            ),
            trace=trace,
            strategy_table_version=self.strategy.version or None,
            finished_at=time.time(),
        )

    @staticmethod
    def _trace_points(workers: dict[str, WorkerStatus], t: float) -> list[list[float]]:
        points = []
        for name, status in sorted(workers.items()):
            if status.role != "generation":
                continue
            index = float(name.rsplit("-", 1)[-1]) if name[-1].isdigit() else 0.0
            points.append(
                [
                    round(t, 3),
                    index,
                    float(status.running),
                    float(status.k or 0),
                    float(status.tokens_per_second or 0.0),
                ]
            )
        return points

    # -- reporting --------------------------------------------------------------------------

    def _record(self, metrics: IterationMetrics) -> None:
        self.last = metrics
        self.bus.metrics.observe_iteration(metrics)
        self.bus.publish(self.keys.metrics_stream, metrics)
        if self.metrics_path is not None:
            with self.metrics_path.open("a", encoding="utf-8") as sink:
                sink.write(json.dumps(metrics.model_dump(mode="json")) + "\n")
        if self.on_metrics is not None:
            self.on_metrics(metrics)
        state = "succeeded" if metrics.iteration == self.total else "running"
        self._progress(metrics.iteration, state, f"iteration {metrics.iteration} trained")

    def _progress(
        self,
        iteration: int,
        state: str,
        message: str,
        *,
        workers: dict[str, WorkerStatus] | None = None,
    ) -> None:
        last = self.last
        strategy = None
        if last is not None and last.strategies:
            strategy = Counter(last.strategies).most_common(1)[0][0]
        if workers:
            live = [w for w in workers.values() if w.role == "generation" and w.drafter]
            if live:
                strategy = f"{live[0].drafter}:k={live[0].k}"
            stale = [
                w.worker
                for w in workers.values()
                if time.time() - w.updated_at > STALE_WORKER_SECONDS and w.state != "stopping"
            ]
            if stale:
                message += f" (no heartbeat from {', '.join(sorted(stale))})"
        progress = JobProgress(
            iteration=iteration,
            total_iterations=self.total,
            state=state,  # type: ignore[arg-type]
            message=message,
            tokens_per_second=last.tokens_per_second if last else None,
            mean_accepted_length=last.mean_accepted_length if last else None,
            strategy=strategy,
            strategy_table_version=last.strategy_table_version if last else None,
            migrations=last.migrations if last else 0,
            reward_mean=last.reward_mean if last else None,
            kl=last.kl if last else None,
            weight_version=last.weight_version if last else 0,
            updated_at=time.time(),
        )
        self.bus.call(
            "write progress", lambda: self.bus.redis.set(self.keys.progress, progress.to_bytes())
        )


def run(job: RLHFJob, paths: ResolvedPaths, bus: Bus) -> int:
    metrics_path = bus.env.storage / "metrics.jsonl"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    return Coordinator(job, paths, bus, metrics_path=metrics_path).run()
