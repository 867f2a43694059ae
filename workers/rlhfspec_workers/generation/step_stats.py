"""What one engine step and one finished sample leave behind, read off vLLM's outputs.

Where it sits: ``engine.GenerationEngine`` registers :class:`StepStatsSink` as vLLM's
in-process stat logger, and after every ``LLMEngine.step`` turns the step's scheduler stats
and the proposer's feedback into a :class:`StepRecord` (:func:`step_record`), and each
finished request into a :class:`SampleResult` (:func:`sample_result`). Pure reads of vLLM's
objects: no engine state lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from .draft_strategy import OFF, DraftChoice, StepFeedback
from .records import PromptInput, SampleResult, StepRecord

__all__ = [
    "SPEC_COUNTERS",
    "StepStatsSink",
    "request_progress",
    "request_state",
    "sample_result",
    "spec_counters",
    "step_record",
]

SPEC_COUNTERS = (
    "vllm:spec_decode_num_drafts",
    "vllm:spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens",
    "vllm:spec_decode_num_accepted_tokens_per_pos",
)


def spec_counters(metrics: Sequence[Any]) -> dict[str, Any]:
    """The :data:`SPEC_COUNTERS` of ``LLMEngine.get_metrics()`` (process-wide, cumulative)."""
    out: dict[str, Any] = {name: 0 for name in SPEC_COUNTERS}
    for metric in metrics:
        if metric.name in out:
            values = getattr(metric, "values", None)
            out[metric.name] = list(values) if values is not None else getattr(metric, "value", 0)
    return out


class StepStatsSink(StatLoggerBase):  # type: ignore[misc]
    """Receives vLLM's SchedulerStats after every step (in-process stat logger)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.stats: list[Any] = []
        self.prompt_tokens = 0
        """Prompt tokens prefilled since the engine last took this count."""

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.stats.append(scheduler_stats)
        if iteration_stats is not None:
            self.prompt_tokens += int(iteration_stats.num_prompt_tokens)

    def log_engine_initialized(self) -> None:
        pass


def step_record(
    index: int,
    spec: Any,
    *,
    batch_size: int,
    finished: int,
    verified: DraftChoice,
    feedback: Sequence[StepFeedback] | None,
    next_choice: DraftChoice,
    next_tokens: int,
    seconds: float,
    draft_seconds: float,
    prefill_tokens: int = 0,
    gap_seconds: float = 0.0,
) -> StepRecord:
    """One step's record. ``spec``: vLLM's ``spec_decoding_stats`` of the step (None without
    drafts); ``feedback``: the adaptive proposer's per-step feedback (None on the native
    backend, whose proposer counts are then -1)."""
    num_drafts = spec.num_drafts if spec else 0
    return StepRecord(
        step=index,
        batch_size=batch_size,
        num_finished=finished,
        drafter=verified.drafter if num_drafts else OFF,
        k=verified.k if num_drafts else 0,
        num_drafts=num_drafts,
        num_draft_tokens=spec.num_draft_tokens if spec else 0,
        num_accepted_tokens=spec.num_accepted_tokens if spec else 0,
        accepted_per_pos=tuple(spec.num_accepted_tokens_per_pos) if spec else (),
        drafted_per_pos=tuple(spec.num_draft_tokens_per_pos) if spec else (),
        proposer_draft_tokens=(
            sum(f.num_draft_tokens for f in feedback) if feedback is not None else -1
        ),
        proposer_accepted_tokens=(
            sum(f.num_accepted_tokens for f in feedback) if feedback is not None else -1
        ),
        next_drafter=next_choice.drafter,
        next_k=next_choice.k,
        next_draft_tokens=next_tokens,
        step_seconds=seconds,
        draft_seconds=draft_seconds,
        prefill_tokens=prefill_tokens,
        gap_seconds=gap_seconds,
    )


def sample_result(
    out: Any, p: PromptInput, j: int, *, prefix: int = 0, top: int = 0, with_text: bool = True
) -> SampleResult:
    """Sample ``j`` of prompt ``p`` from vLLM's finished ``RequestOutput``. ``prefix``: tokens
    a resumed sample carried in its prompt; ``top``: top log-probs kept per position."""
    completion = out.outputs[0]
    tokens = [int(t) for t in completion.token_ids]
    # Each position holds the sampled token's entry (plus the top ones when asked for).
    per_token = completion.logprobs or []
    logprobs = [float(lp[t].logprob) for lp, t in zip(per_token, tokens, strict=True)]
    top_logprobs: list[list[float]] = []
    if top:
        top_logprobs = [sorted((float(e.logprob) for e in lp.values()), reverse=True)[:top]
                        for lp in per_token]  # fmt: skip
    metrics = getattr(completion, "spec_decode_metrics", None)
    drafted = accepted = 0
    if metrics is not None:
        drafted = int(metrics.num_draft_tokens)
        accepted = sum(n * c for n, c in enumerate(metrics.histogram))
    prompt_ids = [int(t) for t in out.prompt_token_ids or []]
    return SampleResult(
        sample_id=f"{p.prompt_id}/{j}",
        prompt_id=p.prompt_id,
        group_id=p.group_id or p.prompt_id,
        sample_index=j,
        # A resumed sample's prompt holds its earlier tokens: report the original prompt.
        prompt_token_ids=prompt_ids[: len(prompt_ids) - prefix],
        token_ids=tokens,
        logprobs=logprobs,
        finish_reason=completion.finish_reason,
        text=completion.text if with_text else None,
        num_draft_tokens=drafted,
        num_accepted_tokens=accepted,
        top_logprobs=top_logprobs,
    )


def request_state(processor: Any, request_id: str) -> Any:
    """vLLM's output-processor state of a running request (by our id or vLLM's), or None."""
    for internal in processor.external_req_ids.get(request_id, ()):
        state = processor.request_states.get(internal)
        if state is not None:
            return state
    return processor.request_states.get(request_id)


def request_progress(state: Any) -> tuple[list[int], list[float]]:
    """What a running request generated so far, with the sampled tokens' log-probs."""
    if state is None or state.detokenizer is None:
        return [], []
    tokens = [int(t) for t in state.detokenizer.output_token_ids]
    processor = state.logprobs_processor
    entries: Any = (processor.logprobs if processor is not None else None) or []
    # logprobs=0: each position holds exactly the sampled token's entry.
    logprobs = [float(lp[t].logprob) for lp, t in zip(entries, tokens, strict=True)]
    return tokens, logprobs
