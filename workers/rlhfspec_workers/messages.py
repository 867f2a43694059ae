"""Every payload that crosses Redis: one module, typed and versioned.

Where it sits: between all processes of a job. The coordinator, generation, inference and
trainer workers write and read these; the operator reads :class:`JobProgress` to fill the
RLHFJob status (it may import this module: pure pydantic, no engine code). A message carries
``kind`` and ``version``; :func:`decode` rejects unknown kinds and versions with
:class:`MessageError` instead of guessing, so a rolling upgrade never silently misreads data.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Every Redis key name lives beside the payloads, in redis_keys; importers keep reading it here.
from .redis_keys import Keys as Keys

SCHEMA_VERSION = 1
FIELD = b"data"
"""The one field of a stream entry, holding its message (``runtime.Bus`` writes and reads it)."""


class MessageError(ValueError):
    """A payload that is not a valid message of the expected kind and version."""


class Message(BaseModel):
    """Base of all Redis payloads: JSON bytes with a kind and a schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KIND: ClassVar[str] = "message"
    version: int = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        body = self.model_dump(mode="json")
        body["kind"] = self.KIND
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls: type[_M], raw: bytes | str) -> _M:
        return decode(raw, cls)


_M = TypeVar("_M", bound=Message)


def decode(raw: bytes | str, expected: type[_M]) -> _M:
    """Parse ``raw`` as an ``expected`` message; raise MessageError saying what is wrong."""
    try:
        body: Any = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MessageError(f"expected a JSON object, got {type(body).__name__}")
    kind = body.pop("kind", None)
    if kind != expected.KIND:
        raise MessageError(f"kind {kind!r} is not {expected.KIND!r}")
    version = body.get("version")
    if version != SCHEMA_VERSION:
        raise MessageError(
            f"{expected.KIND} version {version!r} unsupported (want {SCHEMA_VERSION})"
        )
    try:
        return expected.model_validate(body)
    except ValidationError as exc:
        raise MessageError(f"invalid {expected.KIND}: {exc.errors(include_url=False)}") from None


class JobProgress(Message):
    """The coordinator's running summary of a job; the operator copies it into the status."""

    KIND: ClassVar[str] = "job_progress"
    iteration: int = Field(ge=0)
    total_iterations: int = Field(ge=0)
    state: Literal["starting", "running", "succeeded", "failed"] = "running"
    message: str = ""
    tokens_per_second: float | None = None
    mean_accepted_length: float | None = None
    strategy: str | None = None
    strategy_table_version: int | None = None
    migrations: int = 0
    reward_mean: float | None = None
    kl: float | None = None
    eval_accuracy: float | None = None
    """Held-out accuracy of the latest evaluated policy version."""
    weight_version: int = 0
    collapsed_drafters: dict[str, float] = Field(default_factory=dict)
    """Drafters whose pooled mean accepted length fell to ~1 (stale after a weight sync) ->
    that mean accepted length; the operator shows them as the DrafterCollapsed condition."""
    updated_at: float = 0.0
    """Unix time the coordinator wrote this (the operator flags stale progress)."""


class ChatMessage(BaseModel):
    """One turn of a chat prompt (a dataset row whose prompt field is a list of these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class SampleTask(Message):
    """One sample to generate (the unit of work, migration and fault recovery).

    Published by the coordinator to the prompts stream; a resumed sample (migrated or
    reclaimed after a fault) carries what was generated so far in ``prefix_*`` and a
    ``max_tokens`` reduced by it, so the stitched rollout is the one an unmigrated run makes."""

    KIND: ClassVar[str] = "sample_task"
    iteration: int = Field(ge=0)
    sample_id: str = Field(min_length=1)
    """Unique within the job: ``it<iteration>/<prompt_id>/<sample_index>``."""
    prompt_id: str
    group_id: str
    """Same for every iteration's samples of one dataset prompt (the suffix drafter's key)."""
    sample_index: int = Field(ge=0)
    prompt: str
    """The prompt text (a chat prompt's last user turn, for logs and rewards)."""
    messages: list[ChatMessage] | None = None
    """A chat prompt: rendered with the policy tokenizer's chat template (``prompt`` is then
    only its text)."""
    answer: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    """The dataset row's other fields, handed to a function reward."""
    eval: bool = False
    """A held-out evaluation sample: greedy, scored, never trained on. Its ``iteration`` is
    the policy version it evaluates (0: the initial weights)."""
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0)
    top_p: float = Field(gt=0.0, le=1.0)
    seed: int | None = None
    ignore_eos: bool = False
    """Generate exactly max_tokens (benchmarks that need controlled lengths)."""
    weight_version: int = Field(default=0, ge=0)
    """The policy version that must generate this sample (on-policy)."""
    prefix_token_ids: list[int] = Field(default_factory=list)
    prefix_logprobs: list[float] = Field(default_factory=list)
    migrations: int = Field(default=0, ge=0)
    kv_snapshot_url: str | None = None
    """Migrated by KV transfer: where the source serves its :class:`KVSnapshot`, once (gone:
    the destination recomputes the prefix instead). No credential: the destination proves it
    belongs to the job with a token of its own (``generation.kv_auth``)."""


class KVSnapshot(Message):
    """A migrating sample's paged KV: the cache blocks holding its first ``len(token_ids)``
    context tokens in every attention layer, stacked [layer, block, *block_shape] in
    ``dtype`` (block interiors are the attention backend's own layout). It goes from the
    source worker to the destination directly (``generation.kv_outbox``), not through Redis;
    the task pointing at it does.

    Megabytes of tensor data do not belong in JSON (base64 and parsing cost ~90 ms per 4 MB on
    the CPU here, a few ms this way): on the wire it is ``KV_FRAME_MAGIC``, the JSON header's
    length (4 bytes, big-endian), the JSON header (every field but ``data``, with kind and
    version, checked like any message), then ``data`` raw. Between outbox and destination the
    frame travels sealed (an HMAC with the job's key appended, ``generation.kv_auth``)."""

    KIND: ClassVar[str] = "kv_snapshot"
    sample_id: str = Field(min_length=1)
    token_ids: list[int] = Field(min_length=1)
    block_size: int = Field(ge=1)
    dtype: Literal["float32", "bfloat16", "float16"]
    layer_names: list[str] = Field(min_length=1)
    block_shape: list[int] = Field(min_length=1)
    data: bytes = Field(default=b"", exclude=True, repr=False)

    def to_bytes(self) -> bytes:
        header = super().to_bytes()
        return KV_FRAME_MAGIC + len(header).to_bytes(4, "big") + header + self.data

    @classmethod
    def from_bytes(cls, raw: bytes | str) -> KVSnapshot:
        if isinstance(raw, str) or not raw.startswith(KV_FRAME_MAGIC):
            raise MessageError(f"{cls.KIND}: not a KV snapshot frame")
        start = len(KV_FRAME_MAGIC) + 4
        size = int.from_bytes(raw[len(KV_FRAME_MAGIC) : start], "big")
        if start + size > len(raw):
            raise MessageError(f"{cls.KIND}: header of {size} bytes overruns the frame")
        header = decode(raw[start : start + size], cls)
        return header.model_copy(update={"data": raw[start + size :]})


KV_FRAME_MAGIC = b"RSKV"


class Rollout(Message):
    """A finished sample with the policy's log-probs: generation -> inference."""

    KIND: ClassVar[str] = "rollout"
    iteration: int = Field(ge=0)
    sample_id: str
    prompt_id: str
    group_id: str
    sample_index: int = Field(ge=0)
    prompt: str
    messages: list[ChatMessage] | None = None
    answer: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    eval: bool = False
    """Generated from an eval task: scored into :class:`EvalScore`, never trained on."""
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    """log p_policy(token_t | prefix) of each generated token (aligned with token_ids)."""
    text: str
    finish_reason: str | None
    weight_version: int = Field(ge=0)
    worker: str
    num_draft_tokens: int = Field(default=0, ge=0)
    num_accepted_tokens: int = Field(default=0, ge=0)
    migrations: int = Field(default=0, ge=0)


class Experience(Message):
    """A scored rollout: inference -> trainer."""

    KIND: ClassVar[str] = "experience"
    rollout: Rollout
    reward: float
    ref_logprobs: list[float]
    """log p_reference(token_t | prefix), aligned with rollout.token_ids."""
    values: list[float] | None = None
    """ppo: critic value before each generated token, aligned with rollout.token_ids."""


class EvalScore(Message):
    """One held-out sample's score: inference -> coordinator (a hash per evaluated version)."""

    KIND: ClassVar[str] = "eval_score"
    weight_version: int = Field(ge=0)
    sample_id: str
    reward: float
    response_tokens: int = Field(ge=0)
    finish_reason: str | None = None


class WeightsPublished(Message):
    """The trainer finished an iteration and wrote policy weights ``policy_version``.

    (``version`` is every message's schema version; this is the policy's.)"""

    KIND: ClassVar[str] = "weights_published"
    policy_version: int = Field(ge=0)
    iteration: int = Field(ge=0)
    path: str
    """HF-format model directory on shared storage."""
    policy_loss: float | None = None
    value_loss: float | None = None
    kl: float | None = None
    entropy: float | None = None
    reward_mean: float | None = None
    reward_std: float | None = None
    response_length_mean: float | None = None
    samples: int = 0
    train_seconds: float = 0.0
    logprob_mismatch_mean: float | None = None
    """Mean |log p_rollout - log p_trainer| over response tokens (engine vs trainer numerics)."""
    logprob_mismatch_max: float | None = None
    rollout_kl: float | None = None
    """Token-mean k3 estimate of KL(rollout policy || trainer policy) at the old weights."""
    draft_version: int | None = None
    """The draft model generation drafts with next (``draft_model`` with ``refresh``): the
    iteration whose rollouts it was last distilled on, 0 for the draft as given."""
    draft_path: str | None = None
    """HF-format directory of that draft (``drafts/v<N>`` on shared storage, or the spec's)."""
    draft_refresh_seconds: float = 0.0
    """Trainer time spent refreshing the draft after this iteration (0: not refreshed)."""


class WorkerStatus(Message):
    """A worker's heartbeat and load report (hash field per worker, refreshed each second)."""

    KIND: ClassVar[str] = "worker_status"
    worker: str
    role: Literal["coordinator", "generation", "inference", "trainer"]
    state: Literal["starting", "ready", "busy", "syncing", "stopping", "degraded"] = "ready"
    message: str = ""
    weight_version: int = 0
    strategy_table_version: int | None = None
    running: int = 0
    """Samples in the engine now (generation)."""
    tokens_generated: int = 0
    tokens_per_second: float | None = None
    mean_accepted_length: float | None = None
    drafter: str | None = None
    k: int | None = None
    updated_at: float = 0.0


class StrategyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_batch: int = Field(ge=1)
    max_batch: int = Field(ge=1)
    drafter: str
    k: int = Field(ge=0)


class StrategyTable(Message):
    """Batch-size bucket -> (drafter, k), computed by the coordinator from pooled stats."""

    KIND: ClassVar[str] = "strategy_table"
    table_version: int = Field(ge=1)
    entries: list[StrategyEntry]
    acceptance: dict[str, list[float]] = Field(default_factory=dict)
    """The pooled per-position acceptance behind the table (drafter -> rate per position)."""


class AcceptanceReport(Message):
    """A generation worker's speculative counters since its last report (deltas)."""

    KIND: ClassVar[str] = "acceptance_report"
    worker: str
    weight_version: int = 0
    drafter: str
    drafts: int = Field(ge=0)
    drafted_per_pos: list[int]
    accepted_per_pos: list[int]


class MigrationOrder(Message):
    """Coordinator -> source worker: hand these running samples over to ``destination``."""

    KIND: ClassVar[str] = "migration_order"
    order_id: str
    source: str
    destination: str
    sample_ids: list[str]
    mode: Literal["recompute", "kv_transfer"] = "recompute"
    predicted_gain_seconds: float = 0.0


class SampleLoad(BaseModel):
    """One sample a generation worker holds (planner input)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sample_id: str
    group_id: str
    generated: int = Field(ge=0)
    """Tokens generated so far, including any generated elsewhere before a migration."""
    prompt_tokens: int = Field(ge=0)
    max_tokens: int = Field(ge=1)
    running: bool = True
    migrations: int = Field(default=0, ge=0)


class LoadReport(Message):
    """A generation worker's load, refreshed every heartbeat (the reallocation planner's input)."""

    KIND: ClassVar[str] = "load_report"
    worker: str
    iteration: int = Field(ge=0)
    free_slots: int = Field(ge=0)
    samples: list[SampleLoad] = Field(default_factory=list)
    finished_lengths: list[int] = Field(default_factory=list)
    """Response lengths of samples finished since the previous report (length predictor)."""
    step_profile: list[list[float]] = Field(default_factory=list)
    """Recent engine steps as [batch size, seconds per step, tokens per sequence per step]
    (the planner's throughput model of this worker)."""
    kv_bytes_per_token: float = Field(default=0.0, ge=0.0)
    """KV snapshot bytes per context token (measured on snapshots sent, else the cache
    layout's); 0: this worker has no KV migration path."""
    kv_bytes_per_second: float | None = Field(default=None, gt=0.0)
    """Measured KV hand-over rate in engine time (read out of the cache and encoded as a
    source, decoded as a destination); None before its first KV migration."""
    prefill_seconds_per_token: float | None = Field(default=None, gt=0.0)
    """Measured engine seconds per prompt token prefilled (steps that prefilled, less a
    decode step's time); None before any. What a recomputed migration's context costs."""
    updated_at: float = 0.0


class IterationMetrics(Message):
    """One iteration's record: Redis metrics stream and the run directory's metrics.jsonl."""

    KIND: ClassVar[str] = "iteration_metrics"
    iteration: int = Field(ge=1)
    total_iterations: int = Field(ge=1)
    samples: int = 0
    reward_mean: float | None = None
    reward_std: float | None = None
    kl: float | None = None
    policy_loss: float | None = None
    value_loss: float | None = None
    entropy: float | None = None
    response_length_mean: float | None = None
    tokens: int = 0
    tokens_per_second: float | None = None
    mean_accepted_length: float | None = None
    strategies: dict[str, int] = Field(default_factory=dict)
    """``drafter:k=K`` -> engine steps run with it."""
    strategy_table_version: int | None = None
    migrations: int = 0
    reclaimed: int = 0
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    """generation, inference, training, sync, total."""
    weight_version: int = 0
    batch_trace: list[list[float]] = Field(default_factory=list)
    """[t_seconds, worker_index, running_batch, k, tokens_per_second, tokens_so_far] rows over
    the generation stage (t from the iteration's start; the rate and the count come from the
    worker's generated-token counter, so the rows add up to the iteration's tokens)."""
    finished_at: float = 0.0
    logprob_mismatch_mean: float | None = None
    """Mean |log p_rollout - log p_trainer| per response token (see WeightsPublished)."""
    logprob_mismatch_max: float | None = None
    rollout_kl: float | None = None
    eval_accuracy: float | None = None
    """Held-out accuracy of this iteration's weights, greedy: the fraction of eval samples
    scoring full credit (the sum of the rule rewards' positive weights; 1 without rule
    rewards). None when no eval ran this iteration."""
    eval_reward_mean: float | None = None
    eval_samples: int = 0
    eval_seconds: float = 0.0
    baseline_eval_accuracy: float | None = None
    """Iteration 1 only: the held-out accuracy of the initial weights (before any training)."""
    draft_acceptance: dict[str, float] = Field(default_factory=dict)
    """Drafter -> accepted / drafted tokens in this iteration's generation (drafters that
    drafted at least one token)."""
    draft_version: int | None = None
    """The draft model version that drafted in this iteration (the oldest, if workers held
    different ones; 0: the draft as given). None when the draft model drafted nothing."""
    draft_refresh_seconds: float = 0.0
    """Trainer time spent refreshing the draft after this iteration (0: not refreshed)."""


class JobFailure(Message):
    """A worker cannot go on (a reward function raised, returned the wrong length ...): the
    coordinator fails the job with this reason, naming ``field``. What was in flight stays in
    Redis (unacked), so a fixed job resumes from it."""

    KIND: ClassVar[str] = "job_failure"
    worker: str
    field: str
    """The spec field at fault, e.g. ``spec.reward.function``."""
    reason: str
    iteration: int | None = None
    failed_at: float = 0.0


class StorageFull(Message):
    """A write to the job's storage was refused for lack of room (the trainer retries it);
    the operator shows it as the job's StorageFull condition until the key is cleared."""

    KIND: ClassVar[str] = "storage_full"
    worker: str
    path: str
    needed_bytes: int = Field(ge=0)
    """Estimated from the previous complete write of the same kind."""
    free_bytes: int = Field(ge=0)
    message: str
    reported_at: float = 0.0


class DeadLetter(Message):
    """A payload a worker could not use: kept with the reason, never dropped silently."""

    KIND: ClassVar[str] = "dead_letter"
    source_stream: str
    entry_id: str
    sample_id: str | None = None
    reason: str
    raw: str
