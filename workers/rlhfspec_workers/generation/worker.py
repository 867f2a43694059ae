"""The generation worker: SampleTasks in from Redis, vLLM with adaptive drafting, Rollouts out.

Where it sits: ``rlhfspec worker generation`` (one per generation pod, or per local process).
It consumes the job's task stream through the ``generation`` consumer group, keeps the engine
full (free slots are refilled every step, so the long tail never blocks new work), publishes
each finished sample as a :class:`Rollout` the moment it finishes, then acks its task. Before
starting a task that needs a newer policy it drains, syncs weights from shared storage and
resumes (on-policy). A dead worker's unacked tasks are reclaimed by the others after a lease;
a live worker renews the lease of the tasks it runs so long samples are not stolen.

Every sample it holds lives in one :class:`SampleTable` (queued, pulling its KV snapshot,
running, then finished or preempted), under its task's sample id, which also names its engine
request; the loop here, the hand-over (``handover``: migration, reclaim, load reports) and the
KV pulls (``kv_pull``) move samples only through the table's transitions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlhfspec_api.generation import MigrationMethod
from rlhfspec_api.manifest import RLHFJob
from rlhfspec_workers.drafters.draft_model import DraftModelDrafter
from rlhfspec_workers.faults import fault_point
from rlhfspec_workers.hardware import resolve_engine_dtype
from rlhfspec_workers.messages import Keys, Rollout, SampleTask, WeightsPublished, WorkerStatus
from rlhfspec_workers.preflight import ResolvedPaths
from rlhfspec_workers.redis_keys import GenStatsField
from rlhfspec_workers.runtime import Bus

from .adaptive import AdaptiveStrategy, expected_batch, make_strategy
from .broadcast import StrategySync
from .counters import GenerationCounters
from .draft_strategy import NO_DRAFT, DraftStrategy, FixedStrategy
from .engine import GenerationEngine
from .handover import Handover, ack
from .kv_auth import KVAuth
from .kv_outbox import KVOutbox
from .kv_pull import KVPulls
from .native_setup import native_engine_args, native_strategy
from .records import PromptInput, SampleResult, SamplingConfig, StepRecord
from .sample_table import Sample, SampleTable

LEASE_MS = int(os.environ.get("RLHFSPEC_TASK_LEASE_MS", "30000"))
"""A task unacked this long by a consumer that stopped renewing it is reclaimed."""
ADMIT_PER_STEP = 16
"""Tasks taken from the shared stream per engine step: small, so replicas share the queue
evenly instead of the first one up taking everything (the long tail is then reallocation's
job). A worker's own direct stream is read whole."""
HEARTBEAT_SECONDS = 0.5
MAX_RUNNING = 256
"""Engine slots (vLLM max_num_seqs); tasks beyond it wait in the stream for any worker."""


def draft_model_paths(job: RLHFJob, models: Mapping[str, Path]) -> dict[int, Path]:
    """Drafter index -> its model directory, from preflight's resolved models."""
    drafters = job.spec.generation.speculative.drafters
    out: dict[int, Path] = {}
    for i in range(len(drafters)):
        key = f"spec.generation.speculative.drafters[{i}].model"
        if key in models:
            out[i] = models[key]
    return out


class GenerationWorker:
    def __init__(
        self,
        job: RLHFJob,
        paths: ResolvedPaths,
        bus: Bus,
        engine: GenerationEngine,
        draft_strategy: DraftStrategy | None = None,
    ) -> None:
        self.job = job
        self.bus = bus
        self.keys: Keys = bus.keys
        self.engine = engine
        self.name = bus.env.worker
        self.max_running = MAX_RUNNING
        self.table = SampleTable()
        """Every sample this worker holds, queued or running, by sample id."""
        self.iteration: int | None = None
        """Newest iteration this worker generates for: engine steps are counted under it
        (also the step that finishes its last samples, when nothing is in flight any more)."""
        self.direct = self.keys.direct_tasks(self.name)
        env = bus.env
        kv_auth: KVAuth | None = None
        if env.kv_secret is not None:
            kv_auth = KVAuth(env.kv_secret.encode(), f"{env.namespace}/{env.job}")
        self.outbox: KVOutbox | None = None
        if engine.kv is not None and kv_auth is None:
            # Never an open port: without the job's key samples migrate by recompute.
            print(f"[rlhfspec] {self.name}: no RLHFSPEC_KV_SECRET: KV snapshots are neither "
                  "served nor loaded here, migrated samples recompute", flush=True)  # fmt: skip
        elif engine.kv is not None and kv_auth is not None:
            self.outbox = KVOutbox(env.kv_host, env.kv_port, auth=kv_auth)
        self.counters = GenerationCounters()
        self.handover = Handover(
            bus, self.table, engine, self.outbox, self.counters, self.max_running
        )
        self.pulls = KVPulls(self.name, engine.kv, kv_auth, self.counters, bus.dead_letter,
                             self.handover.observe_kv_received)  # fmt: skip
        self.strategy = StrategySync(bus, self.name, draft_strategy or FixedStrategy(NO_DRAFT))
        self._last_step: StepRecord | None = None
        self._last_beat = 0.0
        self._kv_load_seen = 0.0
        self._last_renew = time.monotonic()
        self._last_reclaim = time.monotonic()
        self.state = "ready"

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        bus = self.bus
        self.strategy.publish_calibration()
        for stream in (self.direct, self.keys.tasks):
            bus.ensure_group(stream, Keys.GENERATION_GROUP)
            # After a restart, first take back what this consumer was given and never acked.
            self._take(stream, 10_000, None, pending=True)
        while not bus.stop_requested():
            self._maybe_sync()
            self.handover.execute_orders()
            self._admit()
            self._finish(self.engine.poll_by_request())
            self._record_steps()
            self._housekeeping()
        self.state = "stopping"
        self._beat(force=True)
        if self.outbox is not None:
            self.outbox.close()
        self.pulls.close()
        return 0

    def _admit(self) -> None:
        """Fill free engine slots: waiting tasks first, then new ones from the stream."""
        table = self.table
        free = self.max_running - len(table)
        if free > 0:
            # Samples handed to this worker (migrations, a static partition) first, all of
            # them: left unread in Redis they would be load the planner cannot see.
            free -= self._take(self.direct, free, None)
        free = min(free, ADMIT_PER_STEP)
        if free > 0:
            self._take(self.keys.tasks, free, 200 if not table else None)
        # A task that needs the next policy stays first in line: finish what runs, then
        # sync (_maybe_sync). The done check is one round trip for every ready task.
        ready = table.ready(self.engine.weight_version)
        done = self._already_done([sample.task for sample in ready])
        for sample, is_done in zip(ready, done, strict=True):
            if is_done:
                table.finish_elsewhere(sample.sample_id)
                ack(self.bus, sample)
            elif self.pulls.ready(table, sample):  # else its KV snapshot is on the way
                self._submit(sample)

    def _take(self, stream: str, count: int, block_ms: int | None, pending: bool = False) -> int:
        got = self.bus.read_group(
            stream, Keys.GENERATION_GROUP, SampleTask, count=count, block_ms=block_ms,
            pending=pending,
        )  # fmt: skip
        for entry_id, task in got:
            self.table.add(stream, entry_id, task)
        return len(got)

    def _already_done(self, tasks: list[SampleTask]) -> list[bool]:
        """Whether each task's sample was already published (a redelivered or reclaimed
        task), in one round trip."""
        if not tasks:
            return []
        keys = self.keys

        def check(pipe: Any) -> None:
            for task in tasks:
                pipe.sismember(keys.done_samples(task.iteration, eval=task.eval), task.sample_id)

        return [bool(hit) for hit in self.bus.pipelined("check done", check)]

    def _submit(self, sample: Sample) -> None:
        task = sample.task
        prompt = PromptInput(
            prompt=task.prompt,
            prompt_id=f"{'eval' if task.eval else 'it'}{task.iteration}/{task.prompt_id}",
            group_id=task.group_id,
            max_tokens=task.max_tokens,
            messages=[m.model_dump() for m in task.messages] if task.messages else None,
        )
        sampling = SamplingConfig(
            temperature=task.temperature,
            top_p=task.top_p,
            max_tokens=task.max_tokens,
            seed=self.job.spec.algorithm.seed,  # a sample's tokens: f(job seed, sample id)
            ignore_eos=task.ignore_eos,
            stop=tuple(self.job.spec.generation.stop),
        )
        kv = self.pulls.load(task, sample.pull)
        # The engine request is named by the sample id: its result comes back under it.
        prefix, sample_id = task.prefix_token_ids, task.sample_id
        try:
            self.engine.submit(prompt, sampling, task.sample_index, prefix_token_ids=prefix,
                               kv=kv, request_id=sample_id)  # fmt: skip
        except ValueError as exc:  # a snapshot that does not fit this engine: recompute
            if kv is None:
                raise
            self.pulls.fallback(task, "refused", str(exc))
            self.engine.submit(prompt, sampling, task.sample_index, prefix_token_ids=prefix,
                               request_id=sample_id)  # fmt: skip
        self.table.start(sample_id)
        if not task.eval:  # held-out samples are not part of any iteration's counters
            self.iteration = max(self.iteration or 0, task.iteration)

    def _finish(self, results: dict[str, SampleResult]) -> None:
        """Publish the step's finished samples (by sample id), mark them done and ack their
        tasks: one transaction for the whole step, so a sample is never published without
        being marked done (a redelivered task is then skipped, not generated twice). The
        iteration's ``tokens`` and ``samples`` figures are added in the same transaction, by
        the call that marks the sample done and only if it was not done yet: each published
        sample counts once, with its whole response (a migrated sample's prefix included),
        however often it was decoded (a worker killed before publishing decodes it again)."""
        if not results:
            return
        finished: list[tuple[Sample, Rollout]] = []
        for sample_id, result in results.items():
            sample = self.table.finish(sample_id)
            finished.append((sample, self._rollout(sample.task, result)))
        keys = self.keys

        def publish(pipe: Any) -> None:
            for sample, rollout in finished:
                task = sample.task
                self.bus.queue_publish(pipe, keys.rollouts, rollout)
                done = keys.done_samples(task.iteration, eval=task.eval)
                if task.eval:  # held-out samples are not part of any iteration's counters
                    pipe.sadd(done, task.sample_id)
                else:
                    figures = {"tokens": float(len(rollout.token_ids)), "samples": 1.0}
                    stats = keys.generation_stats(task.iteration)
                    self.bus.queue_mark_done(pipe, done, task.sample_id, stats, figures)
                for stream, entry_ids in sample.entries_by_stream().items():
                    pipe.xack(stream, Keys.GENERATION_GROUP, *entry_ids)

        for sample, rollout in finished:
            task = sample.task
            self.counters.count_generated(task, len(rollout.token_ids) - len(task.prefix_token_ids))
            if not task.eval:
                self.handover.observe_finished(len(rollout.token_ids))
        if not self.table.running():
            # This worker's last samples: its other counters (engine steps, strategies) reach
            # Redis before they are marked done. The coordinator reads an iteration's figures
            # once training is over, which on a small job comes sooner than the next heartbeat.
            self._record_steps()
            self._beat(force=True)
        fault_point("before_publish_rollouts")
        self.bus.pipelined("publish rollouts", publish)
        fault_point("after_publish_rollouts")

    def _rollout(self, task: SampleTask, result: SampleResult) -> Rollout:
        return Rollout(
            iteration=task.iteration,
            sample_id=task.sample_id,
            prompt_id=task.prompt_id,
            group_id=task.group_id,
            sample_index=task.sample_index,
            prompt=task.prompt,
            messages=task.messages,
            answer=task.answer,
            metadata=task.metadata,
            eval=task.eval,
            prompt_token_ids=result.prompt_token_ids,
            # A resumed sample is stitched: what was generated elsewhere, then what ran here.
            token_ids=[*task.prefix_token_ids, *result.token_ids],
            logprobs=[*task.prefix_logprobs, *result.logprobs],
            text=self._detokenize([*task.prefix_token_ids, *result.token_ids], result),
            finish_reason=result.finish_reason,
            weight_version=self.engine.weight_version,
            worker=self.name,
            num_draft_tokens=result.num_draft_tokens,
            num_accepted_tokens=result.num_accepted_tokens,
            migrations=task.migrations,
        )

    def _detokenize(self, tokens: list[int], result: SampleResult) -> str:
        if not tokens:
            return ""
        if result.text is not None and len(tokens) == len(result.token_ids):
            return result.text
        tokenizer = self.engine.engine.get_tokenizer()
        return str(tokenizer.decode(tokens, skip_special_tokens=True))

    def _record_steps(self) -> None:
        """Engine steps -> per-iteration counters (sequence steps, strategies)."""
        steps = self.engine.drain_steps()
        if not steps:
            return
        iteration = self.iteration
        if any(s.task.eval for s in self.table.running()):
            iteration = None  # a held-out pass: its steps belong to no iteration's figures
        for step in steps:
            self._last_step = step
            self.handover.observe_step(step)
            self.strategy.observe(step)
            self.bus.metrics.observe_step(step)
            if iteration is None:
                continue
            self.counters.add(iteration, "sequence_steps", step.batch_size)
            self.counters.add(iteration, "steps", 1)
            self.counters.add(iteration, GenStatsField.strategy(step.drafter, step.k), 1)
            self.counters.add(iteration, "draft_tokens", step.num_draft_tokens)
            self.counters.add(iteration, "accepted_tokens", step.num_accepted_tokens)
            if step.num_draft_tokens:
                drafted, accepted = step.num_draft_tokens, step.num_accepted_tokens
                self.counters.add(iteration, GenStatsField.drafted(step.drafter), drafted)
                self.counters.add(iteration, GenStatsField.accepted(step.drafter), accepted)
                if step.drafter == DraftModelDrafter.name:  # which draft version drafted
                    version = GenStatsField.draft_version(self.engine.draft_version)
                    self.counters.add(iteration, version, drafted)

    # -- weight sync ------------------------------------------------------------------------

    def _maybe_sync(self) -> None:
        """Sync when idle and a newer policy exists (or a waiting task needs one)."""
        if self.table.running():
            return
        needed = self.table.next_weight_version()
        latest = self.bus.get(self.keys.weights, WeightsPublished)
        if latest is None or latest.policy_version <= self.engine.weight_version:
            if needed is not None and needed > self.engine.weight_version:
                time.sleep(0.05)  # the trainer has not published it yet
            return
        self.state = "syncing"
        self._beat(force=True)
        started = time.perf_counter()
        self.engine.load_weights(Path(latest.path), latest.policy_version)
        draft = latest.draft_version
        if draft is not None and latest.draft_path and draft != self.engine.draft_version:
            loaded = self.engine.load_draft(Path(latest.draft_path), draft)
            if loaded and self.strategy.adaptive:  # the old draft's acceptance is not its own
                self.strategy.adaptive.drafter_changed(DraftModelDrafter.name)
        self.engine.new_iteration()  # last iteration's rollouts become suffix-drafter history
        seconds = time.perf_counter() - started
        self.bus.metrics.set_weight_version(latest.policy_version)
        iteration = latest.iteration + 1
        self.counters.add(iteration, GenStatsField.sync(self.name), seconds)
        print(
            f"[rlhfspec] {self.name}: policy v{latest.policy_version} "
            f"{'' if draft is None else f'and draft v{self.engine.draft_version} '}"
            f"loaded in {seconds:.2f}s",
            flush=True,
        )
        self.state = "ready"

    # -- leases, reclaim, heartbeat ---------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_renew > LEASE_MS / 3000:
            self._last_renew = now
            self.handover.renew_leases()
        if now - self._last_reclaim > LEASE_MS / 3000:
            self._last_reclaim = now
            self.handover.reclaim_from_dead_workers(LEASE_MS)
        self._beat()

    def _beat(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < HEARTBEAT_SECONDS:
            return
        self._last_beat = now
        if self.engine.kv is not None and self.iteration:
            # Loads happen inside vLLM steps (the connector times them): charge the iteration.
            loaded = self.engine.kv.stats().load_seconds
            if loaded > self._kv_load_seen:
                self.counters.add(self.iteration, "kv_load_seconds", loaded - self._kv_load_seen)
                self._kv_load_seen = loaded
        for iteration, values in self.counters.drain().items():
            self.bus.add_to_hash(self.keys.generation_stats(iteration), values)
        self.handover.report_load()
        self.strategy.flush(self.engine.weight_version)
        running = len(self.table.running())
        step = self._last_step
        self.bus.heartbeat(
            WorkerStatus(
                worker=self.name,
                role="generation",
                state="busy" if running else self.state,  # type: ignore[arg-type]
                weight_version=self.engine.weight_version,
                strategy_table_version=self.strategy.table_version,
                running=running,
                tokens_generated=self.counters.tokens_total,
                tokens_per_second=self.counters.tokens_per_second(now),
                drafter=step.next_drafter if step else None,
                k=step.next_k if step else None,
            )
        )


def run(job: RLHFJob, paths: ResolvedPaths, bus: Bus) -> int:
    spec = job.spec
    speculative = spec.generation.speculative
    # selector.execution native: vLLM's own drafter, whose k per batch size the selector sets.
    engine = GenerationEngine(
        spec.generation,
        paths.models["spec.models.policy"],
        draft_models=draft_model_paths(job, paths.models),
        seed=spec.algorithm.seed,
        dtype=resolve_engine_dtype(spec.generation.dtype),
        chat_template=spec.dataset.chat_template,
        max_num_seqs=MAX_RUNNING,
        kv_migration=spec.generation.reallocation.migration is not MigrationMethod.RECOMPUTE,
        **native_engine_args(spec.generation, MAX_RUNNING),
    )
    draft_strategy: DraftStrategy | None = None
    try:
        # Calibrate only batches this worker will run (its share of an iteration's samples).
        max_batch = expected_batch(spec, MAX_RUNNING)
        if speculative.native_execution:
            draft_strategy = native_strategy(engine, spec.generation, max_batch=max_batch)
        else:
            draft_strategy = make_strategy(engine, spec.generation, max_batch=max_batch)
        if engine.proposer is not None:
            engine.set_strategy(draft_strategy)
        bus.metrics.reexport_vllm(engine.counters)
        return GenerationWorker(job, paths, bus, engine, draft_strategy).run()
    finally:
        if isinstance(draft_strategy, AdaptiveStrategy) and draft_strategy.learner is not None:
            draft_strategy.learner.save_now()  # what the last steps taught the cost table
        engine.close()
