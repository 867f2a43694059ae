"""The coordinator: drives iterations (prompts -> generation -> inference -> training -> sync).

Where it sits: ``rlhfspec worker coordinator``, one per job (its pod's exit code is the job's
outcome for the operator). Per iteration it publishes the SampleTasks, watches the stages
through Redis (done/scored sets, the generation counters, worker heartbeats) while the
workers stream samples through, waits for the trainer's WeightsPublished for the iteration,
then writes one IterationMetrics record (Redis stream + ``metrics.jsonl`` on job storage) and
the JobProgress the operator copies into the RLHFJob status. Restarted, it resumes after the
last recorded row (``metrics_record``), not the last published weights: the iteration it was
killed in may have finished training meanwhile, and still gets its one row. It republishes
the same sample ids (every stage deduplicates).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhfspec_api.manifest import RLHFJob
from rlhfspec_workers.data.rows import Splits, load_splits
from rlhfspec_workers.faults import fault_point
from rlhfspec_workers.messages import (
    IterationMetrics,
    JobFailure,
    JobProgress,
    Keys,
    MessageError,
    SampleTask,
    WorkerStatus,
)
from rlhfspec_workers.preflight import ResolvedPaths
from rlhfspec_workers.runtime import Bus

from .metrics_record import (
    append_row,
    last_recorded_iteration,
    recorded_rows,
    repair_metrics_file,
    weights_of,
)
from .reallocate import Reallocator
from .strategy import StrategyBroadcaster
from .tasks import (
    EvalSummary,
    StageClock,
    eval_due,
    eval_summary,
    eval_tasks,
    full_credit,
    iteration_metrics,
    iteration_tasks,
)

POLL_SECONDS = 0.25
TRAINER_POLL_SECONDS = 0.02
TRACE_EVERY_SECONDS = 0.5
STALE_WORKER_SECONDS = 120.0


class JobFailed(Exception):
    """A worker reported that the job cannot go on (``Keys.failure``); the job is failed."""


def load_dataset(job: RLHFJob, paths: ResolvedPaths) -> Splits:
    """The job's training and held-out rows (preflight already checked every row)."""
    spec = job.spec
    dataset = spec.dataset
    return load_splits(
        paths.dataset,
        paths.eval_dataset,
        prompt_field=dataset.prompt_field,
        answer_field=dataset.answer_field,
        eval_fraction=dataset.eval_fraction,
        require_answer=False,
        seed=spec.algorithm.seed,
    )


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
        splits = load_dataset(job, paths)
        self.rows, self.eval_rows = splits.train, splits.eval
        self.baseline: EvalSummary | None = None
        self._trace_base: dict[str, tuple[int, float, int]] = {}
        self.last_eval: EvalSummary | None = None
        self.total = self.spec.algorithm.iterations
        self.metrics_path = metrics_path
        self.on_metrics = on_metrics
        self.last: IterationMetrics | None = None
        self.reallocator = Reallocator(self.spec, bus, bus.env.replicas)
        self.strategy = StrategyBroadcaster(self.spec, bus)

    def run(self) -> int:
        bus, keys = self.bus, self.keys
        bus.wait_ready()
        # A failure a worker reported before a resume is the old run's (fixed since).
        bus.clear_stop_and_failure()
        # Groups exist before the first payload, so no consumer misses an entry.
        bus.ensure_group(keys.tasks, Keys.GENERATION_GROUP)
        bus.ensure_group(keys.rollouts, Keys.INFERENCE_GROUP)
        bus.ensure_group(keys.experience, Keys.TRAINER_GROUP)
        # After the last row, not the last weights: an iteration that finished training while
        # this coordinator was down is recorded now (its weights are read back, not awaited).
        rows = recorded_rows(bus)
        repaired = repair_metrics_file(self.metrics_path, rows)
        if repaired:
            print(f"[rlhfspec] coordinator: metrics.jsonl completed with rows {repaired}",
                  flush=True)  # fmt: skip
        self.last = rows[-1] if rows else None
        start = last_recorded_iteration(rows) + 1
        if start > self.total:
            self._progress(self.total, "succeeded", "all iterations already trained")
            bus.request_stop()
            return 0
        self._progress(start - 1, "starting", f"starting at iteration {start}")
        self._wait_for_workers(start - 1)
        if start == 1 and eval_due(self.spec, 0):
            self.baseline = self._evaluate(0)
        for iteration in range(start, self.total + 1):
            metrics = self._iteration(iteration)
            if eval_due(self.spec, iteration):
                metrics = self._with_eval(metrics, self._evaluate(iteration))
            if iteration == 1 and self.baseline is not None:
                update = {"baseline_eval_accuracy": self.baseline.accuracy}
                metrics = metrics.model_copy(update=update)
            self._record(metrics)
        self._progress(self.total, "succeeded", "done")
        bus.request_stop()
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
            self._check_failure(done)
            self._progress(done, "starting", f"waiting for {', '.join(missing)}")
            time.sleep(POLL_SECONDS)

    # -- one iteration ----------------------------------------------------------------------

    def _iteration(self, iteration: int) -> IterationMetrics:
        bus = self.bus
        tasks = iteration_tasks(self.spec, self.rows, iteration)
        expected = len(tasks)
        started = time.monotonic()
        published_flag = f"published:{iteration}"
        state = bus.coordinator_state()
        if published_flag in state and int(state.get("iteration", 0)) == iteration:
            # A restart mid-iteration: the stages have run since the tasks went out, so the
            # row's clock starts then (the stage split counts this coordinator's downtime).
            started -= max(0.0, time.time() - float(state.get("started_at", time.time())))
        else:
            if published_flag not in state:
                self._publish_tasks(tasks)
            bus.update_coordinator_state(
                {
                    "iteration": iteration,
                    "samples": expected,
                    published_flag: 1,
                    "started_at": time.time(),
                }
            )
        fault_point("coordinator_mid_iteration")
        self._progress(iteration - 1, "running", f"iteration {iteration}: generating")
        generation_done = inference_done = None
        trace: list[list[float]] = []
        # worker -> (tokens at stage start, last row's t, tokens then); seeded by the
        # first heartbeat read, before any of this iteration's samples can have finished.
        self._trace_base = {
            name: (w.tokens_generated, 0.0, w.tokens_generated)
            for name, w in bus.workers().items()
            if w.role == "generation"
        }
        last_trace = 0.0
        while True:
            now = time.monotonic()
            done = bus.samples_done(iteration)
            scored = bus.samples_scored(iteration)
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
            self._check_failure(iteration - 1)
            weights = weights_of(bus, iteration)
            if weights is not None:
                self.strategy.draft_published(weights.draft_version)
                break
            # Once every sample is scored only the trainer is left: the next iteration waits
            # on this poll noticing its weights, so look more often (a cheap GET).
            time.sleep(POLL_SECONDS if inference_done is None else TRAINER_POLL_SECONDS)
        finished = time.monotonic()
        # The stage's closing rows, at its end: the last samples' tokens (heartbeats lag the
        # done set by up to a beat; by now every worker has reported them).
        trace.extend(self._trace_points(bus.workers(), (generation_done or finished) - started))
        return iteration_metrics(
            iteration=iteration,
            total=self.total,
            gen_stats=bus.generation_stats(iteration),
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

    def _publish_tasks(self, tasks: list[SampleTask]) -> None:
        """All of an iteration's tasks in one round trip (one XADD each, one transaction):
        the generation workers wait on this between iterations."""
        keys = self.keys

        def publish(pipe: Any) -> None:
            for task in tasks:
                self.bus.queue_publish(pipe, keys.tasks, task)

        self.bus.pipelined("publish tasks", publish)

    # -- held-out evaluation ------------------------------------------------------------------

    def _evaluate(self, version: int) -> EvalSummary:
        """Score policy ``version`` on the held-out split: greedy samples through the same
        generation and inference workers (which keep them out of training), then wait for
        every score. Published once per version, so a restarted coordinator only waits."""
        bus = self.bus
        tasks = eval_tasks(self.spec, self.eval_rows, version)
        started = time.monotonic()
        flag = f"eval-published:{version}"
        if flag not in bus.coordinator_state():
            self._publish_tasks(tasks)
            bus.update_coordinator_state({flag: 1})
        last_report = 0.0
        while True:
            scored = bus.eval_scores_count(version)
            if scored >= len(tasks):
                break
            self._check_failure(version)
            now = time.monotonic()
            if now - last_report >= TRACE_EVERY_SECONDS:
                last_report = now
                self._progress(
                    version,
                    "running",
                    f"evaluating policy v{version}: {scored}/{len(tasks)} held-out scored",
                )
            time.sleep(POLL_SECONDS)
        summary = eval_summary(
            version,
            [s.reward for s in bus.eval_scores(version)],
            time.monotonic() - started,
            credit=full_credit(self.spec),
        )
        print(
            f"[rlhfspec] coordinator: policy v{version} held-out accuracy "
            f"{summary.accuracy:.3f} ({summary.samples} samples, {summary.seconds:.1f}s)",
            flush=True,
        )
        self.last_eval = summary
        return summary

    @staticmethod
    def _with_eval(metrics: IterationMetrics, summary: EvalSummary) -> IterationMetrics:
        return metrics.model_copy(
            update={
                "eval_accuracy": summary.accuracy,
                "eval_reward_mean": summary.reward_mean,
                "eval_samples": summary.samples,
                "eval_seconds": summary.seconds,
            }
        )

    def _trace_points(self, workers: dict[str, WorkerStatus], t: float) -> list[list[float]]:
        """One row per generation worker: [t, worker, running, k, tokens/s, tokens so far].

        The rate is the worker's generated-token counter over the interval since this
        stage's previous row (not the worker's own recent-window figure). The counter is the
        work a worker decoded; the iteration's tokens (what tokens/s is computed from) count
        each published sample once. Without kills the rows of a stage add up to exactly those
        tokens; a worker killed before publishing decodes its samples again (and its counter
        restarts from 0), so there they differ."""
        points = []
        for name, status in sorted(workers.items()):
            if status.role != "generation":
                continue
            index = float(name.rsplit("-", 1)[-1]) if name[-1].isdigit() else 0.0
            base, last_t, last_tokens = self._trace_base.setdefault(
                name, (status.tokens_generated, 0.0, status.tokens_generated)
            )
            rate = (status.tokens_generated - last_tokens) / max(t - last_t, 1e-9)
            self._trace_base[name] = (base, t, status.tokens_generated)
            points.append(
                [
                    # Microseconds, not milliseconds: a row's rate times its interval must add
                    # back up to its tokens, and at thousands of tokens a second a millisecond
                    # of rounding in a short closing interval lost 3% of a stage's tokens.
                    round(t, 6),
                    index,
                    float(status.running),
                    float(status.k or 0),
                    round(rate, 3),
                    float(status.tokens_generated - base),
                ]
            )
        return points

    # -- reporting --------------------------------------------------------------------------

    def _check_failure(self, iteration: int) -> None:
        """Fail the job when a worker reported it cannot go on (a reward that cannot score):
        progress state failed with the field and reason, the stop flag set, JobFailed raised."""
        try:
            failure = self.bus.get(self.keys.failure, JobFailure)
        except MessageError as exc:
            message = f"a worker reported a failure this version cannot read: {exc}"
        else:
            if failure is None:
                return
            message = f"{failure.field}: {failure.reason} (reported by {failure.worker})"
        self._progress(iteration, "failed", message)
        self.bus.request_stop()
        print(f"[rlhfspec] coordinator: job failed: {message}", file=sys.stderr, flush=True)
        raise JobFailed(message)

    def _record(self, metrics: IterationMetrics) -> None:
        self.last = metrics
        self.bus.metrics.observe_iteration(metrics)
        # The stream first: it is the record a restart resumes from and repairs the file with.
        self.bus.publish(self.keys.metrics_stream, metrics)
        if self.metrics_path is not None:
            append_row(self.metrics_path, metrics)
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
            eval_accuracy=self.last_eval.accuracy if self.last_eval else None,
            kl=last.kl if last else None,
            weight_version=last.weight_version if last else 0,
            # Drafters the pooled acceptance found collapsed: the DrafterCollapsed condition.
            collapsed_drafters=dict(self.strategy.collapsed),
            updated_at=time.time(),
        )
        self.bus.put(self.keys.progress, progress)


def run(job: RLHFJob, paths: ResolvedPaths, bus: Bus) -> int:
    metrics_path = bus.env.storage / "metrics.jsonl"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Coordinator(job, paths, bus, metrics_path=metrics_path).run()
    except JobFailed:
        return 1
