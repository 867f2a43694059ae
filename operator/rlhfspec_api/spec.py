"""The RLHFJob spec: what a user applies with ``kubectl apply``.

Where it sits: parsed once by ``manifest.parse_rlhfjob`` (CLI ``validate``, local mode, the
operator's handlers); components receive typed sub-configs (``spec.algorithm``,
``spec.generation`` ...). The CRD's openAPIV3Schema is generated from these classes by
``crd``; rules JSON Schema cannot express (ppo needs a critic ...) are the
``model_validator``s below and run in every parse.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from rlhfspec_api.base import (
    Bool,
    ContractModel,
    DnsSubdomain,
    Float,
    ImageRef,
    Int,
    PathText,
    PlainText,
    Quantity,
    RedisUrl,
    SecretKey,
)
from rlhfspec_api.generation import DrafterMethod, GenerationSpec
from rlhfspec_api.models import (
    FetchCredentials,
    ModelRef,
    Resources,
    check_dataset_location,
)
from rlhfspec_api.rewards import (
    MAX_REWARDS,
    RewardRule,
    RewardSpec,
    named_terms,
    reward_violations,
)
from rlhfspec_api.rewards import RewardType as RewardType  # re-exported for spec's users
from rlhfspec_api.rules import Violation, raise_if_any
from rlhfspec_api.scheduling import PodTemplateOverrides

# Deadlines are added to timestamps; 2^31-1 seconds (68 years) keeps that arithmetic safe.
MAX_DEADLINE_SECONDS = 2**31 - 1


class AlgorithmName(StrEnum):
    GRPO = "grpo"
    PPO = "ppo"
    RLOO = "rloo"


GROUP_ALGORITHMS = frozenset({AlgorithmName.GRPO, AlgorithmName.RLOO})
"""Algorithms whose baseline is the prompt's group: they need 2 or more samples per prompt."""
CRITIC_ALGORITHMS = frozenset({AlgorithmName.PPO})
"""Algorithms that learn a value model: they need ``models.critic``."""


class AlgorithmSpec(ContractModel):
    """The RL algorithm and its optimisation hyper-parameters."""

    name: AlgorithmName = AlgorithmName.GRPO
    """grpo: group-normalised advantages, no critic; ppo: GAE with a learned critic; rloo:
    each sample's reward minus the mean of its group's other samples (leave-one-out), no
    critic, no std scaling."""
    iterations: Int = Field(default=10, ge=1, le=1_000_000)
    """Generation -> inference -> training iterations to run."""
    prompts_per_iteration: Int = Field(default=32, ge=1, le=1_000_000)
    """Prompts sampled from the dataset per iteration."""
    samples_per_prompt: Int = Field(default=8, ge=1, le=1024)
    """Responses sampled per prompt (the group size of GRPO)."""
    learning_rate: Float = Field(default=5e-5, gt=0.0, le=1.0)
    """Adam learning rate of the policy (and critic)."""
    kl_coef: Float = Field(default=0.01, ge=0.0, le=100.0)
    """Weight of the KL penalty to the reference model."""
    clip_range: Float = Field(default=0.2, gt=0.0, le=10.0)
    """PPO-style ratio clipping epsilon."""
    micro_batch_size: Int = Field(default=64, ge=1, le=1_000_000)
    """Samples per forward/backward pass; gradients accumulate over micro-batches."""
    mini_batches: Int = Field(default=2, ge=1, le=1024)
    """Optimizer steps per iteration (the iteration's samples are split into this many)."""
    gamma: Float = Field(default=1.0, ge=0.0, le=1.0)
    """ppo: discount factor."""
    gae_lambda: Float = Field(default=0.95, ge=0.0, le=1.0)
    """ppo: GAE lambda."""
    value_clip_range: Float = Field(default=0.2, gt=0.0, le=100.0)
    """ppo: value-function clipping epsilon."""
    seed: Int = Field(default=0, ge=0, le=2**31 - 1)
    """Seed of prompt sampling, generation and training."""

    @property
    def needs_critic(self) -> bool:
        return self.name in CRITIC_ALGORITHMS

    @property
    def samples_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt


class ModelsSpec(ContractModel):
    """The models of the job. Draft models are listed with their drafters."""

    policy: ModelRef
    """The policy's initial weights (the model being trained)."""
    reference: ModelRef | None = None
    """The KL reference; defaults to the policy's initial weights."""
    critic: ModelRef | None = None
    """ppo: the value model's initial weights (required for ppo)."""
    reward: ModelRef | None = None
    """A sequence-classification reward model (required when reward.type is model)."""


class ChatTemplate(StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class DatasetSpec(ContractModel):
    """The prompt dataset: JSON lines or Parquet, one prompt per row, and its held-out split."""

    path: PathText
    """Path or URI of a .jsonl or .parquet file (``tiny://dataset/train.jsonl``,
    ``pvc://data/x.parquet``, a local path; ``hf://datasets/org/name/train.jsonl`` and
    ``https://host/train.jsonl`` are downloaded into the job's storage first)."""
    prompt_field: PlainText = "prompt"
    """Field holding the prompt: a string, or a list of ``{role, content}`` chat messages.
    Dots name nested keys (``question.text``)."""
    answer_field: PlainText | None = "answer"
    """Field holding the reference answer rewards compare with (dots for nested keys; null if
    none). Numbers are read as their text."""
    chat_template: ChatTemplate = ChatTemplate.AUTO
    """How a string prompt becomes the policy's input: on (or true) = one user turn rendered
    with the policy tokenizer's chat template, generation prompt appended; off (or false) =
    the text as it is; auto = on when the tokenizer defines a chat template. Chat-message
    prompts are always rendered with the template (off is an error for them)."""
    eval: PathText | None = None
    """A held-out split (path or URI, same format and fields as ``path``), scored greedily
    every ``evalEvery`` iterations and never trained on."""
    eval_fraction: Float | None = Field(default=None, gt=0.0, lt=1.0)
    """Instead of ``eval``: hold out this fraction of ``path``'s rows (a seeded draw)."""
    eval_every: Int = Field(default=1, ge=1, le=1_000_000)
    """Score the held-out split after every N-th iteration (and the last), plus once before
    training starts."""
    eval_max_tokens: Int | None = Field(default=None, ge=1, le=131072)
    """Longest held-out response (default: generation.maxNewTokens)."""

    @field_validator("path", "eval")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        return None if value is None else check_dataset_location(value)

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: object) -> object:
        # YAML 1.1 reads unquoted on/off/true/false as booleans.
        if isinstance(value, bool):
            return ChatTemplate.ON if value else ChatTemplate.OFF
        return value

    @model_validator(mode="after")
    def _one_eval_split(self) -> DatasetSpec:
        if self.eval is not None and self.eval_fraction is not None:
            raise_if_any(
                [
                    Violation(
                        "evalFraction",
                        "both eval and evalFraction name a held-out split",
                        "one of eval (a file) or evalFraction (a share of path's rows)",
                    )
                ]
            )
        return self

    @property
    def has_eval(self) -> bool:
        return self.eval is not None or self.eval_fraction is not None


class InferenceSpec(ContractModel):
    """The inference stage: rewards, reference log-probs, critic values."""

    batch_size: Int = Field(default=64, ge=1, le=100_000)
    """Sequences per forward pass."""
    resources: Resources = Field(default_factory=Resources)
    """Resources of the inference pod."""


class TrainerSpec(ContractModel):
    """The training stage."""

    checkpoint_every: Int = Field(default=1, ge=1, le=1_000_000)
    """Write an HF-format checkpoint every N iterations (the trainer resumes from the last)."""
    keep_checkpoints: Int = Field(default=2, ge=1, le=1000)
    """Checkpoints kept on storage; older ones are deleted."""
    resources: Resources = Field(default_factory=Resources)
    """Resources of the trainer pod."""


class CoordinatorMode(StrEnum):
    MANAGED = "managed"
    EXTERNAL = "external"


class SecretKeyRef(ContractModel):
    """A key of a Secret in the job's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """Secret name."""
    key: SecretKey = "password"
    """Key inside the Secret."""


class ConfigMapKeyRef(ContractModel):
    """A key of a ConfigMap in the job's namespace."""

    name: DnsSubdomain
    """ConfigMap name."""
    key: SecretKey = "ca.crt"
    """Key inside the ConfigMap."""


class CoordinatorSpec(ContractModel):
    """The Redis-backed coordinator: work queues, strategy broadcast, migrations, metrics."""

    mode: CoordinatorMode = CoordinatorMode.MANAGED
    """managed: the operator runs a Redis for the job; external: use url."""
    url: RedisUrl | None = None
    """external: Redis URL, e.g. redis://redis.infra:6379/0."""
    password_secret: SecretKeyRef | None = None
    """external: Secret holding the Redis password (managed mode generates one). The Secret
    must carry the label rlhfspec.io/coordinator-password=true."""
    ca_config_map: ConfigMapKeyRef | None = None
    """external, rediss:// only: ConfigMap key holding the PEM CA bundle that verifies the
    Redis server (default: the system's CAs)."""
    redis_image: ImageRef = "redis:7.4-alpine"
    """managed: Redis image."""


class StorageSpec(ContractModel):
    """Where checkpoints and synced weights live. Exactly one of claimName, size or path."""

    claim_name: DnsSubdomain | None = None
    """Use this existing PersistentVolumeClaim."""
    size: Quantity | None = None
    """Create a PersistentVolumeClaim of this size, owned by the job."""
    storage_class_name: DnsSubdomain | None = None
    """Storage class of the created claim."""
    path: PathText | None = None
    """A local directory (local mode, ``rlhfspec run``)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> StorageSpec:
        chosen = [
            name
            for name, value in (
                ("claimName", self.claim_name),
                ("size", self.size),
                ("path", self.path),
            )
            if value is not None
        ]
        violations: list[Violation] = []
        if len(chosen) != 1:
            got = ", ".join(chosen) if chosen else "none"
            violations.append(
                Violation(
                    "",
                    f"exactly one of claimName, size, path is needed, got {got}",
                    "one of claimName, size, path",
                )
            )
        if self.storage_class_name is not None and self.size is None:
            violations.append(
                Violation(
                    "storageClassName",
                    "only applies to a created claim",
                    "set size, or remove storageClassName",
                )
            )
        raise_if_any(violations)
        return self


class RLHFJobSpec(ContractModel):
    """Desired state of an RLHF training job."""

    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    """RL algorithm and hyper-parameters."""
    models: ModelsSpec
    """Policy, reference, critic and reward models."""
    reward: RewardSpec | None = None
    """How responses are scored (default: rule sort_digits, the tiny task's). Give reward or
    rewards, not both."""
    rewards: list[RewardSpec] | None = Field(default=None, min_length=1, max_length=MAX_REWARDS)
    """Several rewards whose weighted scores are summed (instead of reward)."""
    dataset: DatasetSpec
    """Prompt dataset."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    """Generation stage (vLLM, speculative decoding, reallocation)."""
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    """Inference stage."""
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    """Training stage."""
    coordinator: CoordinatorSpec = Field(default_factory=CoordinatorSpec)
    """Coordinator and its Redis."""
    storage: StorageSpec = Field(default_factory=lambda: StorageSpec(size="10Gi"))
    """Checkpoint and weight storage."""
    credentials: FetchCredentials | None = None
    """Secrets the fetch step uses to download hf:// and https:// models and datasets into
    the job's storage (e.g. ``hfToken: {name: hf, key: token}``)."""
    image: ImageRef = "ghcr.io/rlhfspec/worker-cpu:0.1.0"
    """Container image of the workers."""
    backoff_limit: Int = Field(default=3, ge=0, le=1000)
    """Worker pod failures tolerated (each failed pod is recreated) before the job fails."""
    active_deadline_seconds: Int | None = Field(default=None, ge=1, le=MAX_DEADLINE_SECONDS)
    """Fail the job when it runs longer than this."""
    startup_deadline_seconds: Int = Field(default=900, ge=1, le=MAX_DEADLINE_SECONDS)
    """Fail the job when its pods are not all running this long after creation."""
    suspend: Bool = False
    """true deletes worker pods and keeps Redis state and checkpoints; false resumes."""
    pod_template_overrides: PodTemplateOverrides | None = None
    """Scheduling, env and volumes added to the pods, for every role (default) and per role
    (nodeSelector, tolerations, affinity, priorityClassName, imagePullSecrets,
    serviceAccountName, env/envFrom, volumes/volumeMounts, labels/annotations)."""
    ttl_seconds_after_finished: Int | None = Field(default=None, ge=0, le=MAX_DEADLINE_SECONDS)
    """Delete the job's children (pods, Services, ConfigMaps, Secrets, its Redis, the claim it
    created) this long after it Succeeded or Failed; unset keeps them."""
    ttl_deletes_job: Bool = False
    """With ttlSecondsAfterFinished: delete the RLHFJob itself too, not only its children."""

    @model_validator(mode="after")
    def _cross_stage_rules(self) -> RLHFJobSpec:
        algo = self.algorithm
        violations: list[Violation] = []
        if algo.needs_critic and self.models.critic is None:
            violations.append(
                Violation(
                    "models.critic",
                    f"{algo.name.value} needs a critic model",
                    "set models.critic.path",
                )
            )
        if algo.name in GROUP_ALGORITHMS and algo.samples_per_prompt < 2:
            violations.append(
                Violation(
                    "algorithm.samplesPerPrompt",
                    f"{algo.name.value} compares each sample with its prompt's group and needs "
                    f"at least 2 samples per prompt, got {algo.samples_per_prompt}",
                    f">= 2 for {algo.name.value}",
                )
            )
        if algo.micro_batch_size > algo.samples_per_iteration:
            violations.append(
                Violation(
                    "algorithm.microBatchSize",
                    f"{algo.micro_batch_size} exceeds the samples per iteration "
                    f"({algo.samples_per_iteration})",
                    f"1..{algo.samples_per_iteration}",
                )
            )
        if algo.mini_batches > algo.samples_per_iteration:
            violations.append(
                Violation(
                    "algorithm.miniBatches",
                    f"{algo.mini_batches} exceeds the samples per iteration "
                    f"({algo.samples_per_iteration})",
                    f"1..{algo.samples_per_iteration}",
                )
            )
        violations += reward_violations(
            self.reward,
            self.rewards,
            has_reward_model=self.models.reward is not None,
            answer_field=self.dataset.answer_field,
        )
        coord = self.coordinator
        if coord.mode is CoordinatorMode.EXTERNAL and coord.url is None:
            violations.append(
                Violation(
                    "coordinator.url", "external mode needs a Redis URL", "redis://host:port/db"
                )
            )
        if coord.ca_config_map is not None and not (coord.url or "").startswith("rediss://"):
            violations.append(
                Violation(
                    "coordinator.caConfigMap",
                    "a CA verifies a TLS server, and the coordinator URL is not rediss://",
                    "external mode with a rediss:// url, or remove caConfigMap",
                )
            )
        if coord.mode is CoordinatorMode.MANAGED and (coord.url or coord.password_secret):
            violations.append(
                Violation(
                    "coordinator.url",
                    "managed mode runs its own Redis",
                    "remove url and passwordSecret, or set mode: external",
                )
            )
        if self.ttl_deletes_job and self.ttl_seconds_after_finished is None:
            violations.append(
                Violation(
                    "ttlDeletesJob",
                    "deleting the job after its TTL needs a TTL",
                    "set ttlSecondsAfterFinished, or remove ttlDeletesJob",
                )
            )
        speculative = self.generation.speculative
        for index, drafter in enumerate(speculative.drafters):
            if drafter.method is DrafterMethod.EAGLE and self.generation.resources.gpu < 1:
                violations.append(
                    Violation(
                        f"generation.speculative.drafters[{index}].method",
                        "eagle runs only on GPU generation pods",
                        "set generation.resources.gpu >= 1, or use draft_model, ngram, suffix",
                    )
                )
        raise_if_any(violations)
        if self.reward is None and self.rewards is None:
            # Written out, so the config a worker re-reads says which reward the job uses.
            self.reward = RewardSpec(rule=RewardRule.SORT_DIGITS)
        return self

    @property
    def reward_terms(self) -> list[RewardSpec]:
        """The rewards whose weighted scores are summed: ``rewards``, else ``[reward]``."""
        return [term for _, term in self.named_reward_terms]

    @property
    def named_reward_terms(self) -> list[tuple[str, RewardSpec]]:
        """Each reward with the field that names it (``spec.reward``, ``spec.rewards[i]``)."""
        return [(f"spec.{field}", term) for field, term in named_terms(self.reward, self.rewards)]
