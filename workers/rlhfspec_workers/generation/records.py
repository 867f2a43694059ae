"""What goes into and comes out of the generation engine: prompts, samples, step records.

Where it sits: ``engine.GenerationEngine`` takes :class:`PromptInput`s and a
:class:`SamplingConfig`, streams :class:`SampleResult`s (to the inference stage) and leaves
one :class:`StepRecord` per engine step (for the selector, the cost model's calibration and
the benchmarks). Plain dataclasses: no vLLM import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rlhfspec_api.generation import GenerationSpec


@dataclass(frozen=True)
class PromptInput:
    prompt: str | Sequence[int]
    """Text (needs a tokenizer next to the policy) or token ids."""
    prompt_id: str
    n: int = 1
    """Samples of this prompt; each is its own vLLM request, so each streams out alone."""
    group_id: str | None = None
    """Key shared with earlier iterations' rollouts of the prompt (suffix drafter); default
    prompt_id."""
    max_tokens: int | None = None
    """Overrides SamplingConfig.max_tokens (e.g. a resumed sample: its budget minus what it
    already generated elsewhere)."""
    messages: Sequence[Mapping[str, str]] | None = None
    """A chat prompt's turns (``{role, content}``): rendered with the policy tokenizer's
    chat template instead of ``prompt``."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    """Base seed; sample j of prompt p gets a seed derived from (seed, p, j)."""
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    """Strings that end a response; the response text stops before them."""
    top_logprobs: int = 0
    """Also return the n largest log-probs at each position (SampleResult.top_logprobs): how
    close the policy's top candidates were, e.g. to tell a near-tie from a real difference."""

    @classmethod
    def from_spec(cls, spec: GenerationSpec, seed: int | None = None) -> SamplingConfig:
        return cls(spec.temperature, spec.top_p, spec.max_new_tokens, seed, stop=tuple(spec.stop))


@dataclass(frozen=True)
class SampleResult:
    sample_id: str
    prompt_id: str
    group_id: str
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    """The policy's log-prob of each sampled token, from the target's logits at verification
    (vLLM's logprobs_mode; 'processed' = after temperature/top-p, the sampling distribution)."""
    finish_reason: str | None
    text: str | None
    num_draft_tokens: int
    """Draft tokens vLLM verified for this sample."""
    num_accepted_tokens: int
    top_logprobs: list[list[float]] = field(default_factory=list)
    """Per position, the SamplingConfig.top_logprobs largest log-probs, descending (empty
    unless asked for)."""


@dataclass(frozen=True)
class StepRecord:
    """One engine step. Drafts are made in one step and verified in the next: ``drafter``/
    ``k`` and the counts describe the drafts verified here; ``next_*`` the ones made here."""

    step: int
    batch_size: int
    num_finished: int
    drafter: str
    k: int
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_pos: tuple[int, ...]
    drafted_per_pos: tuple[int, ...]
    """vLLM's counters for this step (its SchedulerStats.spec_decoding_stats);
    drafted_per_pos[i]: drafts with more than i tokens, so the verified k shows as the last
    non-zero position."""
    proposer_draft_tokens: int
    proposer_accepted_tokens: int
    """The same as the proposer saw them (must equal vLLM's; -1 on the native backend)."""
    next_drafter: str
    next_k: int
    next_draft_tokens: int
    step_seconds: float
    draft_seconds: float
    """Part of step_seconds spent drafting the next step's tokens."""
    prefill_tokens: int = 0
    """Prompt tokens whose prefill completed in this step: such a step also computed prompts,
    so its time says nothing of decoding at this batch size alone."""
    gap_seconds: float = 0.0
    """Wall time from the end of the previous engine step to the start of this one: the
    worker's own work between steps (Redis reads, admission, load reports). Idle time is
    left out: after a step that left the engine without requests, the gap runs from the
    next submission (a worker waiting seconds for tasks would otherwise price its next
    prefill at seconds per prompt). step + gap is how fast a running sample really
    advances."""
    next_expected_accepted: float = -1.0
    """Draft tokens the strategy expected the drafts made here (``next_*``) to get accepted,
    all rows together (its per-row expectation x the batch size, as the selector scores a
    choice); -1 where it made no prediction (a fixed strategy, nothing drafted, vLLM's own
    drafter). The next step's ``num_accepted_tokens`` is what they got."""
