"""Every Redis key and stream name of a job, in one place.

Where it sits: beside ``messages`` (the payloads), which re-exports :class:`Keys`, so every
process names the same keys; the operator reads progress through it too. Pure: no Redis client
here, only names (the clients are ``runtime.Bus`` and the operator's progress reader).
"""

from __future__ import annotations

from collections.abc import Mapping


class Keys:
    """Redis key and stream names of one job; every name is prefixed by namespace and job."""

    GENERATION_GROUP = "generation"
    INFERENCE_GROUP = "inference"
    TRAINER_GROUP = "trainer"

    def __init__(self, namespace: str, job: str) -> None:
        self.prefix = f"rlhfspec:{namespace or 'default'}:{job}"

    def _key(self, *parts: str | int) -> str:
        return ":".join([self.prefix, *(str(p) for p in parts)])

    @property
    def progress(self) -> str:
        """JobProgress of the job (string key, overwritten)."""
        return self._key("progress")

    @property
    def metrics_stream(self) -> str:
        """IterationMetrics records (stream)."""
        return self._key("metrics")

    @property
    def tasks(self) -> str:
        """SampleTask stream (consumer group ``generation``)."""
        return self._key("tasks")

    @property
    def rollouts(self) -> str:
        """Rollout stream (consumer group ``inference``)."""
        return self._key("rollouts")

    @property
    def experience(self) -> str:
        """Experience stream (consumer group ``trainer``)."""
        return self._key("experience")

    @property
    def weights(self) -> str:
        """Latest WeightsPublished (string key)."""
        return self._key("weights")

    @property
    def weights_log(self) -> str:
        """Every WeightsPublished (stream; the coordinator waits on it)."""
        return self._key("weights-log")

    @property
    def workers(self) -> str:
        """Hash: worker name -> WorkerStatus."""
        return self._key("workers")

    @property
    def strategy(self) -> str:
        """Latest StrategyTable (string key)."""
        return self._key("strategy")

    @property
    def strategy_version(self) -> str:
        """Counter (INCR) of StrategyTable versions: kept in Redis, not in the coordinator's
        memory, so a restarted coordinator's tables are newer than any a worker applied."""
        return self._key("strategy-version")

    @property
    def acceptance(self) -> str:
        """AcceptanceReport stream (the coordinator pools them)."""
        return self._key("acceptance")

    def migrations_for(self, worker: str) -> str:
        """MigrationOrder stream read by one source worker."""
        return self._key("migrate", worker)

    @property
    def dead_letters(self) -> str:
        """DeadLetter stream."""
        return self._key("dead-letters")

    @property
    def stop(self) -> str:
        """Set when every worker should exit (job done or failed)."""
        return self._key("stop")

    @property
    def iteration(self) -> str:
        """Hash: the coordinator's iteration state (iteration, samples, started_at)."""
        return self._key("iteration")

    def done_samples(self, iteration: int, *, eval: bool = False) -> str:
        """Set of sample ids whose rollout was published (idempotency); eval samples keep
        their own sets, keyed by the policy version they evaluate."""
        return self._key("eval-done" if eval else "done", iteration)

    def generation_stats(self, iteration: int) -> str:
        """Hash of one iteration's generation counters, HINCRBY'd by the generation workers;
        its field names are :class:`GenStatsField`'s."""
        return self._key("gen-stats", iteration)

    def scored_samples(self, iteration: int, *, eval: bool = False) -> str:
        """Set of sample ids the inference stage has scored (idempotency)."""
        return self._key("eval-scored" if eval else "scored", iteration)

    def eval_scores(self, version: int) -> str:
        """Hash: eval sample id -> EvalScore, for the policy version evaluated."""
        return self._key("eval-scores", version)

    @property
    def failure(self) -> str:
        """A JobFailure a worker wrote (string key): the coordinator fails the job with it."""
        return self._key("failure")

    @property
    def storage_full(self) -> str:
        """A StorageFull the trainer wrote (string key), deleted once a write succeeds."""
        return self._key("storage-full")

    def load(self, worker: str) -> str:
        """Latest LoadReport of one generation worker (string key)."""
        return self._key("load", worker)

    def direct_tasks(self, worker: str) -> str:
        """SampleTasks handed to one worker (migrated samples; consumer group ``generation``)."""
        return self._key("tasks", worker)

    @property
    def calibration(self) -> str:
        """The generation workers' calibrated cost model (CostModel JSON, string key)."""
        return self._key("calibration")


class GenStatsField:
    """Field names of an iteration's gen-stats hash (:meth:`Keys.generation_stats`).

    Generation workers HINCRBY them; the coordinator's metrics and the trainer's refresh
    trigger read them back. Plain fields: ``tokens``, ``samples``, ``sequence_steps``,
    ``steps``, ``draft_tokens``, ``accepted_tokens``, ``migrations``, ``reclaimed``. Labelled
    fields are ``<kind>:<label>``, one kind per method below."""

    @staticmethod
    def strategy(drafter: str, k: int) -> str:
        """Engine steps run with (drafter, k)."""
        return f"strategy:{drafter}:k={k}"

    @staticmethod
    def drafted(drafter: str) -> str:
        """Tokens ``drafter`` proposed."""
        return f"drafted:{drafter}"

    @staticmethod
    def accepted(drafter: str) -> str:
        """Tokens of ``drafter``'s proposals the target accepted."""
        return f"accepted:{drafter}"

    @staticmethod
    def draft_version(version: int) -> str:
        """Tokens the draft_model drafter proposed with its draft's version ``version``."""
        return f"draft_version:{version}"

    @staticmethod
    def sync(worker: str) -> str:
        """Seconds ``worker`` spent loading new weights."""
        return f"sync:{worker}"

    @staticmethod
    def labelled(stats: Mapping[str, float], kind: str) -> dict[str, float]:
        """label -> value of every ``<kind>:<label>`` field in ``stats``."""
        prefix = f"{kind}:"
        return {k.removeprefix(prefix): v for k, v in stats.items() if k.startswith(prefix)}
