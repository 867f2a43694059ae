"""What one engine step and one finished sample leave behind, read off vLLM's outputs.

Where it sits: ``engine.GenerationEngine`` registers :class:`StepStatsSink` as vLLM's
in-process stat logger and runs every ``LLMEngine.step`` through its :class:`StepRecorder`,
which times the step and turns its scheduler stats and the proposer's feedback into a
:class:`StepRecord` (:func:`step_record`); each finished request becomes a
:class:`SampleResult` (:func:`sample_result`). Reads of vLLM's objects: the recorder's step
count, clock and records are the only state here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from .draft_strategy import NO_DRAFT, OFF, DraftChoice, StepFeedback
from .proposer import AdaptiveProposer
from .records import PromptInput, SampleResult, StepRecord

__all__ = [
    "StepRecorder",
    "StepStatsSink",
    "request_progress",
    "request_state",
    "sample_result",
    "step_record",
]


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
    next_expected_accepted: float = -1.0,
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
        next_expected_accepted=next_expected_accepted,
    )


class StepRecorder:
    """Runs engine steps and keeps a :class:`StepRecord` of each."""

    def __init__(
        self, sink: StepStatsSink, proposer: AdaptiveProposer | None, native_method: str | None
    ) -> None:
        self.sink, self.proposer = sink, proposer
        self.native_method = native_method
        """vLLM's own drafting method (a native engine), whose k is read off its counters."""
        self.steps: list[StepRecord] = []
        self._index = 0
        self._last_end: float | None = None
        self._pending_choice = NO_DRAFT
        """What the proposer chose last step: the drafts this step verifies."""

    def work_arrived(self) -> None:
        """A request was submitted: if the engine had run dry, the worker's own work before
        the next step (admitting the rest of the tasks) is timed from now."""
        if self._last_end is None:
            self._last_end = time.perf_counter()

    def ran_dry(self) -> None:
        """The engine has no requests left without a step ending them (they were aborted or
        moved away): what follows is idle until :meth:`work_arrived`."""
        self._last_end = None

    def run(self, step: Callable[[], list[Any]], busy: Callable[[], bool]) -> list[Any]:
        """One engine step (``LLMEngine.step``), recorded; returns its outputs. ``busy``
        (whether requests remain after the step): once the engine runs dry, the time until work
        arrives again is idle, not the worker's work between steps, so the next step's gap
        starts at :meth:`work_arrived`."""
        started = time.perf_counter()
        gap = 0.0 if self._last_end is None else started - self._last_end
        outputs: list[Any] = step()
        seconds = time.perf_counter() - started
        stats, self.sink.stats = self.sink.stats, []
        prefill_tokens, self.sink.prompt_tokens = self.sink.prompt_tokens, 0
        spec = stats[-1].spec_decoding_stats if stats else None
        finished = sum(1 for o in outputs if o.finished)
        choices, feedback = self.proposer.drain() if self.proposer else ([], [])
        if choices:
            _, batch_size, next_choice, next_tokens, draft_seconds, expected = choices[-1]
        else:
            batch_size = (stats[-1].num_running_reqs if stats else 0) + finished
            next_choice, next_tokens, draft_seconds, expected = NO_DRAFT, 0, 0.0, -1.0
        num_drafts = spec.num_drafts if spec else 0
        drafted = spec.num_draft_tokens if spec else 0
        if feedback:
            verified = feedback[-1].choice
        elif self.native_method is not None and num_drafts:
            verified = DraftChoice(self.native_method, round(drafted / num_drafts))
        else:
            verified = self._pending_choice if self.proposer and drafted else NO_DRAFT
        self._pending_choice = next_choice
        record = step_record(
            self._index,
            spec,
            batch_size=batch_size,
            finished=finished,
            verified=verified,
            feedback=feedback if self.proposer else None,
            next_choice=next_choice,
            next_tokens=next_tokens,
            seconds=seconds,
            draft_seconds=draft_seconds,
            prefill_tokens=prefill_tokens,
            gap_seconds=gap,
            next_expected_accepted=expected,
        )
        self._index += 1
        self.steps.append(record)
        self._last_end = time.perf_counter() if busy() else None
        return outputs

    def drain(self) -> list[StepRecord]:
        steps, self.steps = self.steps, []
        return steps


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
