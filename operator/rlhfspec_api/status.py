"""The RLHFJob status: what ``kubectl get rlhfjobs`` and ``kubectl describe`` show.

Where it sits: written by the operator (phase, conditions, times from observed pods) and fed
by the coordinator's metrics in Redis (iteration, tokens/s, acceptance, strategy, reward).
The CRD's printer columns point into these fields, so their JSON names are part of the API.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from rlhfspec_api.base import ContractModel


class Phase(StrEnum):
    PENDING = "Pending"
    INITIALIZING = "Initializing"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    """Every condition the operator writes on an RLHFJob: the one list of their names."""

    PODS_READY = "PodsReady"
    """Every worker pod is running (False names the ones it waits for)."""
    PROGRESSING = "Progressing"
    """The job moves through its phases (reason: the phase's reason)."""
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    COORDINATOR_REACHABLE = "CoordinatorReachable"
    """The operator reads the coordinator's progress from Redis."""
    STORAGE_FULL = "StorageFull"
    """The trainer cannot write a checkpoint: the job's storage is full."""
    DRAFTER_COLLAPSED = "DrafterCollapsed"
    """A drafter's pooled mean accepted length fell to ~1 (a stale draft model after a weight
    sync): the selector stops using it; set only once one has collapsed."""
    QUEUED = "Queued"
    """A queue (Kueue) holds the job's pods until it admits them as a gang."""
    MODELS_READY = "ModelsReady"
    """hf:// and https:// models and datasets are fetched into the job's storage."""
    SPEC_ACCEPTED = "SpecAccepted"
    """The last spec change was applied (False: refused, the job runs on the last accepted)."""
    CHILDREN_DELETED = "ChildrenDeleted"
    """ttlSecondsAfterFinished deleted the finished job's children."""


class Condition(ContractModel):
    """A Kubernetes-style condition (PodsReady, CoordinatorReachable, Progressing, Failed ...)."""

    type: str
    """Condition type, e.g. PodsReady."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = ""
    """One CamelCase word, e.g. PodFailed."""
    message: str = ""
    """Human-readable detail, e.g. which pod failed and its exit reason."""
    last_transition_time: str | None = None
    """RFC 3339 time the status last changed."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed for."""


class GenerationStatus(ContractModel):
    """Live numbers of the generation stage."""

    tokens_per_second: float | None = None
    """Generated tokens per second over the last iteration (all replicas)."""
    mean_accepted_length: float | None = None
    """Tokens emitted per sequence per verification step (1.0 means drafts never help)."""
    strategy: str | None = None
    """Drafting strategy in use, e.g. draft_model:k=4 or off."""
    strategy_table_version: int | None = None
    """Version of the strategy table the coordinator last broadcast."""
    migrations: int | None = None
    """Samples migrated between replicas during the last trained iteration (the
    coordinator's count of migration handovers; the MIGRATIONS column of -o wide)."""
    weight_version: int | None = None
    """Policy weight version the replicas generate with."""


class RLHFJobStatus(ContractModel):
    """Observed state of an RLHF training job."""

    phase: Phase = Phase.PENDING
    """Pending, Initializing, Running, Suspended, Succeeded or Failed."""
    reason: str | None = None
    """Why the job is in this phase (CamelCase), e.g. ValidationFailed, BackoffLimitExceeded."""
    message: str | None = None
    """Human-readable detail of the reason."""
    conditions: list[Condition] = Field(default_factory=list)
    """Latest observations of the job's state."""
    iteration: int | None = None
    """Iterations completed."""
    total_iterations: int | None = None
    """Iterations requested (spec.algorithm.iterations)."""
    progress: str | None = None
    """iteration/total, e.g. 3/10 (shown by kubectl get)."""
    generation: GenerationStatus | None = None
    """Generation-stage metrics."""
    reward_mean: float | None = None
    """Mean reward of the last iteration's samples."""
    kl: float | None = None
    """Mean KL to the reference of the last iteration."""
    eval_accuracy: float | None = None
    """Held-out accuracy of the latest evaluated policy (dataset.eval / evalFraction)."""
    restarts: int | None = None
    """Worker pods recreated after failures (counts against backoffLimit)."""
    generation_replicas: int | None = None
    """Generation pods running and ready (the scale subresource's status.replicas; compare
    spec.generation.replicas while a scale is under way)."""
    selector: str | None = None
    """Label selector of the job's generation pods, e.g.
    rlhfspec.io/job=tiny-grpo,rlhfspec.io/role=generation (the scale subresource's
    status.selector: what `kubectl scale` and an autoscaler count)."""
    start_time: str | None = None
    """RFC 3339 time the job started running."""
    completion_time: str | None = None
    """RFC 3339 time the job succeeded or failed."""
    observed_generation: int | None = None
    """metadata.generation the status was computed for."""
