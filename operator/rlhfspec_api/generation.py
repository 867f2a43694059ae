"""The generation stage's contract: replicas, sampling, speculative decoding, reallocation.

Where it sits: ``RLHFJobSpec.generation`` (see ``spec``). The generation workers receive
``GenerationSpec`` as their typed config; the selector reads ``SpeculativeSpec``; the
coordinator's migration planner reads ``ReallocationSpec``. Rules that only need these
fields live here; rules that span stages live on ``RLHFJobSpec``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, model_validator

from rlhfspec_api.base import Bool, ContractModel, Float, Int
from rlhfspec_api.models import ModelRef, Resources
from rlhfspec_api.rules import Violation, raise_if_any

MAX_DRAFT_TOKENS_LIMIT = 16


class SpeculativeMode(StrEnum):
    ADAPTIVE = "adaptive"
    FIXED = "fixed"
    OFF = "off"


class DrafterMethod(StrEnum):
    DRAFT_MODEL = "draft_model"
    NGRAM = "ngram"
    SUFFIX = "suffix"
    SUFFIX_TREE = "suffix_tree"
    EAGLE = "eagle"


MODEL_BASED_DRAFTERS = frozenset({DrafterMethod.DRAFT_MODEL, DrafterMethod.EAGLE})
NATIVE_DRAFTERS = frozenset({DrafterMethod.DRAFT_MODEL, DrafterMethod.NGRAM, DrafterMethod.EAGLE})
"""Methods vLLM runs itself (its own speculative path), so ``selector.execution: native``
can set their k."""
REFRESHABLE_DRAFTERS = frozenset({DrafterMethod.DRAFT_MODEL})


class DraftRefreshSpec(ContractModel):
    """Keep a draft model fresh as RL moves the policy.

    After a trained iteration the trainer continues distilling the draft (forward KL to the
    new policy's next-token distribution) on that iteration's rollouts, writes it as
    ``drafts/v<N>``, and generation loads it with the policy weights the trainer publishes
    next (see ``overlap``). Set ``every``, ``onAcceptanceBelow`` or both (either one
    triggers a refresh)."""

    every: Int | None = Field(default=None, ge=1, le=100000)
    """Refresh after every N-th trained iteration."""
    on_acceptance_below: Float | None = Field(default=None, gt=0.0, le=1.0)
    """Refresh after an iteration in which the draft's drafted tokens were accepted at a rate
    below this (or it drafted too little to tell: a stale draft is dropped by the selector)."""
    steps: Int = Field(default=16, ge=1, le=100000)
    """Distillation steps per refresh (AdamW, one batch of rollouts each)."""
    batch_size: Int = Field(default=8, ge=1, le=4096)
    """Rollouts per distillation step."""
    learning_rate: Float = Field(default=1e-4, gt=0.0, le=1.0)
    overlap: Bool = True
    """Distil while the next iteration generates, when the trainer would otherwise wait for
    rollouts: no step waits for the refresh where the trainer has its own accelerator, and
    the draft drafts from the iteration after next. false: distil
    before the weights are published, so the next iteration already drafts with it."""

    @model_validator(mode="after")
    def _check(self) -> DraftRefreshSpec:
        if self.every is None and self.on_acceptance_below is None:
            raise_if_any(
                [
                    Violation(
                        "every",
                        "a refresh needs a trigger",
                        "set every: N, onAcceptanceBelow: x (0 < x <= 1), or both",
                    )
                ]
            )
        return self


class DrafterSpec(ContractModel):
    """One candidate drafter. The adaptive selector chooses among all listed drafters."""

    method: DrafterMethod
    """How drafts are proposed: a separate small model (draft_model), prompt lookup (ngram),
    continuations of sibling and earlier rollouts of the same prompt (suffix), a
    frequency-scored suffix tree over every rollout (suffix_tree), or an EAGLE head (eagle,
    GPU only)."""
    model: ModelRef | None = None
    """The draft model; required for draft_model and eagle, not allowed otherwise."""
    prompt_lookup_min: Int = Field(default=2, ge=1, le=16)
    """ngram: shortest n-gram matched in the context."""
    prompt_lookup_max: Int = Field(default=4, ge=1, le=16)
    """ngram: longest n-gram matched in the context."""
    history_iterations: Int = Field(default=1, ge=0, le=16)
    """suffix, suffix_tree: how many earlier iterations' rollouts feed the suffix index."""
    min_match: Int = Field(default=2, ge=1, le=64)
    """suffix: minimum matched suffix length before a continuation is proposed."""
    refresh: DraftRefreshSpec | None = None
    """draft_model: keep the draft fresh as RL moves the policy (see DraftRefreshSpec);
    unset, the draft stays as loaded."""

    @model_validator(mode="after")
    def _check(self) -> DrafterSpec:
        violations: list[Violation] = []
        if self.method in MODEL_BASED_DRAFTERS and self.model is None:
            violations.append(
                Violation("model", f"{self.method.value} needs a draft model", "set model.path")
            )
        if self.method not in MODEL_BASED_DRAFTERS and self.model is not None:
            violations.append(
                Violation(
                    "model",
                    f"{self.method.value} is model-free and takes no model",
                    "remove model, or use method draft_model or eagle",
                )
            )
        if self.refresh is not None and self.method not in REFRESHABLE_DRAFTERS:
            what = (
                "has no model to refresh"
                if self.method not in MODEL_BASED_DRAFTERS
                else "heads are not distilled by the draft builder"
            )
            violations.append(
                Violation(
                    "refresh",
                    f"{self.method.value} {what}",
                    "refresh applies to method draft_model only; remove refresh",
                )
            )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            violations.append(
                Violation(
                    "promptLookupMin",
                    f"{self.prompt_lookup_min} is greater than promptLookupMax "
                    f"{self.prompt_lookup_max}",
                    "promptLookupMin <= promptLookupMax",
                )
            )
        raise_if_any(violations)
        return self


class SelectorExecution(StrEnum):
    PROPOSER = "proposer"
    NATIVE = "native"


class SelectorSpec(ContractModel):
    """Tuning of the workload-aware drafting-strategy selector (adaptive mode)."""

    execution: SelectorExecution = SelectorExecution.PROPOSER
    """proposer: our adaptive proposer runs every listed drafter and switches between them step
    by step; native: vLLM runs its own drafter (exactly one, of draft_model, ngram or eagle) and
    the selector sets its k per batch size, rewritten after every step. On a GPU vLLM's own
    drafter has paged attention and CUDA graphs."""

    hysteresis: Float = Field(default=0.04, ge=0.0, le=1.0)
    """Relative predicted gain a new strategy needs before the selector switches to it."""
    acceptance_half_life_steps: Int = Field(default=64, ge=1, le=100000)
    """Half-life, in decode steps, of the acceptance estimate; short adapts faster after a
    weight sync, long is less noisy."""
    calibrate: Bool = True
    """Measure the engine's step cost at worker start (cached per model and hardware)."""


class SpeculativeSpec(ContractModel):
    """Speculative decoding. Lossless: rollouts follow exactly the policy's distribution."""

    mode: SpeculativeMode = SpeculativeMode.ADAPTIVE
    """adaptive: choose drafter and draft length every step from batch size, measured cost and
    observed acceptance; fixed: always the first drafter with numDraftTokens; off: plain
    decoding."""
    drafters: list[DrafterSpec] = Field(default_factory=list, max_length=len(DrafterMethod))
    """Candidate drafters (one per method). Left out, the model-free drafters are used:
    suffix and ngram in adaptive mode, suffix in fixed mode."""
    max_draft_tokens: Int = Field(default=8, ge=1, le=MAX_DRAFT_TOKENS_LIMIT)
    """Largest draft length k the engine is prepared for."""
    num_draft_tokens: Int | None = Field(default=None, ge=1, le=MAX_DRAFT_TOKENS_LIMIT)
    """fixed mode: the draft length; defaults to maxDraftTokens."""
    selector: SelectorSpec = Field(default_factory=SelectorSpec)
    """Selector tuning (adaptive mode)."""

    @model_validator(mode="before")
    @classmethod
    def _default_drafters(cls, data: Any) -> Any:
        # Speculation should work out of the box: model-free drafters need no extra model.
        if isinstance(data, dict) and "drafters" not in data:
            mode = data.get("mode", SpeculativeMode.ADAPTIVE.value)
            if mode == SpeculativeMode.ADAPTIVE.value:
                return {**data, "drafters": [{"method": "suffix"}, {"method": "ngram"}]}
            if mode == SpeculativeMode.FIXED.value:
                return {**data, "drafters": [{"method": "suffix"}]}
        return data

    @model_validator(mode="after")
    def _check(self) -> SpeculativeSpec:
        violations: list[Violation] = []
        if self.mode is not SpeculativeMode.OFF and not self.drafters:
            violations.append(
                Violation(
                    "drafters",
                    f"mode {self.mode.value} needs at least one drafter",
                    "list drafters, or set mode: off",
                )
            )
        if self.mode is SpeculativeMode.FIXED and len(self.drafters) > 1:
            violations.append(
                Violation(
                    "drafters",
                    f"mode fixed uses exactly one drafter, got {len(self.drafters)}",
                    "one drafter, or mode: adaptive to choose among several",
                )
            )
        if self.selector.execution is SelectorExecution.NATIVE:
            violations += self._native_violations()
        methods = [d.method for d in self.drafters]
        duplicates = sorted({m.value for m in methods if methods.count(m) > 1})
        if duplicates:
            violations.append(
                Violation(
                    "drafters",
                    f"method listed more than once: {', '.join(duplicates)}",
                    "each method at most once",
                )
            )
        if self.num_draft_tokens is not None:
            if self.mode is not SpeculativeMode.FIXED:
                violations.append(
                    Violation(
                        "numDraftTokens",
                        f"only used in mode fixed (mode is {self.mode.value})",
                        "remove it; adaptive mode chooses k up to maxDraftTokens",
                    )
                )
            elif self.num_draft_tokens > self.max_draft_tokens:
                violations.append(
                    Violation(
                        "numDraftTokens",
                        f"{self.num_draft_tokens} exceeds maxDraftTokens {self.max_draft_tokens}",
                        f"1..{self.max_draft_tokens}",
                    )
                )
        raise_if_any(violations)
        return self

    def _native_violations(self) -> list[Violation]:
        field = "selector.execution"
        if self.mode is not SpeculativeMode.ADAPTIVE:
            return [
                Violation(
                    field,
                    f"native applies to mode adaptive, not {self.mode.value}",
                    "proposer, or mode: adaptive",
                )
            ]
        natives = ", ".join(sorted(m.value for m in NATIVE_DRAFTERS))
        if len(self.drafters) != 1 or self.drafters[0].method not in NATIVE_DRAFTERS:
            got = ", ".join(d.method.value for d in self.drafters) or "none"
            return [
                Violation(
                    field,
                    f"native runs exactly one drafter that vLLM runs itself (got {got})",
                    f"one drafter of {natives}, or proposer",
                )
            ]
        if self.drafters[0].refresh is not None:
            return [
                Violation(
                    field,
                    "native cannot load a refreshed draft into vLLM's own drafter",
                    "proposer, or remove drafters[0].refresh",
                )
            ]
        return []

    @property
    def native_execution(self) -> bool:
        """vLLM's own drafter runs the drafts, the selector sets k (``selector.execution``)."""
        return (
            self.mode is SpeculativeMode.ADAPTIVE
            and self.selector.execution is SelectorExecution.NATIVE
        )

    @property
    def fixed_k(self) -> int:
        """The draft length of fixed mode."""
        return self.num_draft_tokens or self.max_draft_tokens


class EngineDType(StrEnum):
    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class MigrationMethod(StrEnum):
    RECOMPUTE = "recompute"
    KV = "kv"
    AUTO = "auto"


class ReallocationSpec(ContractModel):
    """Sample reallocation between generation replicas as the batch drains unevenly."""

    enabled: Bool = True
    """Let the coordinator migrate in-flight samples between generation workers."""
    imbalance_threshold: Float = Field(default=0.2, ge=0.0, le=10.0)
    """Plan migrations when the slowest worker's predicted finish exceeds the mean by this
    fraction."""
    min_gain_seconds: Float = Field(default=0.05, ge=0.0, le=3600.0)
    """A migration must shorten the predicted stage time by at least this much beyond its own
    cost."""
    interval_seconds: Float = Field(default=0.5, gt=0.0, le=600.0)
    """How often the coordinator re-plans."""
    migration: MigrationMethod = MigrationMethod.AUTO
    """How a sample moves: recompute its prefix on the destination, transfer its KV cache, or
    let the cost model pick (auto)."""


class GenerationSpec(ContractModel):
    """The generation stage: N vLLM replicas sampling responses from the policy."""

    replicas: Int = Field(default=1, ge=1, le=1024)
    """Number of generation workers (pods)."""
    max_new_tokens: Int = Field(default=64, ge=1, le=131072)
    """Longest response, in tokens."""
    temperature: Float = Field(default=1.0, ge=0.0, le=10.0)
    """Sampling temperature; 0 is greedy. On-policy RL normally samples at 1.0."""
    top_p: Float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    stop: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=list, max_length=16
    )
    """Strings that end a response (besides EOS and the chat template's end-of-turn token);
    the stop string is not part of the response text rewards see."""
    speculative: SpeculativeSpec = Field(default_factory=lambda: SpeculativeSpec.model_validate({}))
    """Speculative decoding."""
    reallocation: ReallocationSpec = Field(default_factory=ReallocationSpec)
    """Sample reallocation between replicas."""
    resources: Resources = Field(default_factory=Resources)
    """Resources of each generation pod."""
    dtype: EngineDType = EngineDType.AUTO
    """Compute dtype of the generation engine, as vLLM's ``dtype``. auto: bfloat16 where the
    accelerator or CPU computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX),
    float32 elsewhere. Greedy speculation is bitwise identical to plain decoding in float32
    only; in bf16 verifying k+1 tokens in one forward rounds differently from one-token steps
    (see the README's lossless section)."""
    gpu_memory_utilization: Float = Field(default=0.85, gt=0.0, le=1.0)
    """Fraction of accelerator memory vLLM may use (GPU pods)."""
