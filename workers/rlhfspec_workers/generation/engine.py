"""The generation engine: one in-process vLLM engine, speculative decoding chosen per step.

Where it sits: a generation worker builds a :class:`GenerationEngine` from its typed
``GenerationSpec`` and model paths, queues each sample task with :meth:`submit` (a migrated or
recovered sample with its prefix tokens, or its KV state) and calls :meth:`poll` every loop
turn: one engine step, returning the samples that finished in it, so short samples go to the
inference stage at once. :meth:`generate` wraps submit/poll for whole batches (calibration,
``rlhfspec generate``). Every step leaves a :class:`StepRecord` for the selector and benchmarks.

Speculation backends (``engine_args``): the adaptive proposer (modes adaptive and fixed) is
vLLM's ``custom_class`` proposer (``proposer.AdaptiveProposer``), which owns the drafters and
asks a strategy for (drafter, k) every step; it shares memory with the engine, which therefore
runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here). Native (``native=True``:
baselines, and ``selector.execution: native``) is vLLM's own method, fixed k or Dynamic SD,
whose lookup a ``NativeSchedule`` may rewrite after every step (:meth:`set_native_schedule`).
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfspec_api.generation import GenerationSpec, SpeculativeMode
from rlhfspec_api.spec import ChatTemplate
from rlhfspec_workers import chat, vllm_counters, vllm_fixes
from rlhfspec_workers.drafters.base import Drafter, KeepsHistory
from rlhfspec_workers.drafters.draft_model import DraftModelDrafter
from rlhfspec_workers.faults import fault_point

from . import engine_args as vllm_args
from . import step_stats, weight_sync
from .draft_strategy import NO_DRAFT, DraftChoice, DraftStrategy, FixedStrategy
from .kv_migration import KVMigrationPort, KVState, kv_migration_live
from .proposer import AdaptiveProposer
from .records import PromptInput, SampleResult, SamplingConfig, StepRecord

if TYPE_CHECKING:
    from .native_schedule import NativeSchedule

# The proposer must live in this process (see module docstring). vLLM reads this lazily, at
# engine creation; on CPU it otherwise forces a worker process even with backend "uni".
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from vllm.engine.arg_utils import EngineArgs
from vllm.inputs import TokensPrompt
from vllm.v1.engine.llm_engine import LLMEngine
from vllm.v1.executor.abstract import Executor


def _attach(worker: Any) -> tuple[Any, Any]:
    runner = worker.model_runner
    return runner, getattr(runner, "drafter", None)


class GenerationEngine:
    """One vLLM engine serving a generation worker."""

    def __init__(
        self,
        spec: GenerationSpec,
        policy_model: Path,
        *,
        draft_models: Mapping[int, Path] | None = None,
        strategy: DraftStrategy | None = None,
        native: bool = False,
        per_batch_size: Sequence[tuple[int, int, int]] | None = None,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        kv_cache_bytes: int | None = None,
        device: str | None = None,
        logprobs_mode: str = "processed_logprobs",
        engine_kwargs: Mapping[str, Any] | None = None,
        kv_migration: bool = False,
        chat_template: ChatTemplate | str = ChatTemplate.AUTO,
    ) -> None:
        import torch

        self.spec = spec
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        spec_cfg = spec.speculative
        drafts = dict(draft_models or {})
        self.mode = spec_cfg.mode
        self.native = native
        self.max_k = (
            spec_cfg.fixed_k if self.mode is SpeculativeMode.FIXED else spec_cfg.max_draft_tokens
        )
        speculative_config = vllm_args.speculative_config_for(
            spec_cfg, Path(policy_model), drafts, self.max_k,
            device=self.device, native=native, per_batch_size=per_batch_size,
        )  # fmt: skip
        self.has_tokenizer = vllm_args.has_tokenizer(Path(policy_model))
        args = vllm_args.engine_args(
            spec, Path(policy_model), speculative_config, device=self.device, dtype=dtype,
            seed=seed, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            kv_cache_bytes=kv_cache_bytes, logprobs_mode=logprobs_mode,
            tokenizer=self.has_tokenizer,
        )  # fmt: skip
        # One KV connector serves every engine of a process (kv_migration.py): an engine
        # without it must not start while one with it lives, and the reverse.
        if not kv_migration and kv_migration_live():
            raise RuntimeError("an engine with KV migration lives in this process; close it first")
        self.kv: KVMigrationPort | None = KVMigrationPort() if kv_migration else None
        if self.kv is not None:
            args.update(self.kv.engine_args(self.device))
        args.update(engine_kwargs or {})
        config = EngineArgs(**args).create_engine_config()
        sink = step_stats.StepStatsSink(config)

        def sink_factory(vllm_config: Any, engine_index: int = 0) -> step_stats.StepStatsSink:
            return sink

        vllm_fixes.guard_kernel_rebind()  # before the worker registers its kernel overrides
        self.engine = LLMEngine(
            config,
            Executor.get_class(config),
            log_stats=True,
            stat_loggers=[sink_factory],
            multiprocess_mode=False,
        )
        self.max_model_len = int(config.model_config.max_model_len)
        tokenizer = self.engine.get_tokenizer() if self.has_tokenizer else None
        self._template_text: str | None = getattr(tokenizer, "chat_template", None)
        self.chat_template = self._use_chat_template(ChatTemplate(chat_template))
        self.end_of_turn_ids: tuple[int, ...] = ()
        if tokenizer is not None and self._template_text:
            self.end_of_turn_ids = chat.end_of_turn_ids(tokenizer)
        if self.kv is not None:
            self.kv.attach(self.engine)
        # After the worker registered vLLM's kernel overrides: replace broken ones.
        self.vllm_fixes = vllm_fixes.apply()
        self.proposer: AdaptiveProposer | None = None
        self.drafters: dict[str, Drafter] = {}
        if speculative_config is not None and not native:
            runner, proposer = self.engine.collective_rpc(_attach)[0]
            if not isinstance(proposer, AdaptiveProposer):
                raise RuntimeError("vLLM did not load the adaptive proposer in this process")
            self.drafters = vllm_args.per_step_drafters(
                spec_cfg, drafts, max_num_seqs, self.max_model_len + self.max_k + 2, self.device
            )
            if strategy is None:
                first = spec_cfg.drafters[0].method.value
                strategy = FixedStrategy(DraftChoice(first, self.max_k))
            proposer.configure(runner, self.drafters, strategy)
            self.proposer = proposer
        native_method = spec_cfg.drafters[0].method.value if native and spec_cfg.drafters else None
        self.recorder = step_stats.StepRecorder(sink, self.proposer, native_method)
        self._closed = False
        # vLLM shuts an in-process engine core down when it is garbage-collected, which
        # destroys the distributed groups every other in-process engine uses (see close()).
        finalizer = getattr(self.engine.engine_core, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        self._pending: dict[str, tuple[PromptInput, int, int]] = {}
        self._top_logprobs: dict[str, int] = {}
        self.weight_version = 0
        self.draft_version = 0
        """The draft model's version (0: as given; see :meth:`load_draft`)."""
        self._submitted = 0
        self.native_schedule: NativeSchedule | None = None
        """Keeps vLLM's native k per batch size (:meth:`set_native_schedule`)."""

    # -- control ------------------------------------------------------------------------------

    def set_strategy(self, strategy: DraftStrategy) -> None:
        if self.proposer is None:
            raise RuntimeError("strategies apply to the adaptive proposer only")
        self.proposer.set_strategy(strategy)

    def set_native_schedule(self, schedule: NativeSchedule) -> None:
        """From now on ``schedule`` keeps vLLM's Dynamic SD lookup (batch size -> k), which the
        scheduler reads every step, at our selector's choice: filled now, rewritten around
        the batch's size after every step. Native engines built with ``per_batch_size``."""
        lookup = self.dynamic_sd_lookup()
        schedule.fill(lookup)
        self.native_schedule = schedule

    def dynamic_sd_lookup(self) -> list[int]:
        """vLLM's Dynamic SD lookup of this native engine, batch size -> k (index 0 unused),
        which its scheduler reads every step: the list itself, to be changed in place."""
        core = getattr(self.engine.engine_core, "engine_core", None)
        lookup = getattr(getattr(core, "scheduler", None), "dynamic_sd_lookup", None)
        if not self.native or not isinstance(lookup, list):
            raise RuntimeError(
                "a native schedule needs an in-process engine built with native=True and "
                "per_batch_size (vLLM's Dynamic SD lookup)"
            )
        return lookup

    @property
    def history_drafters(self) -> list[KeepsHistory]:
        """The drafters that keep rollouts across iterations (benchmarks seed and reset them)."""
        return [d for d in self.drafters.values() if isinstance(d, KeepsHistory)]

    def new_iteration(self) -> None:
        """Between RL iterations: every drafter that keeps history across iterations (the
        suffix drafter's rollouts) moves on to the next."""
        for drafter in self.drafters.values():
            if isinstance(drafter, KeepsHistory):
                drafter.new_iteration()
        if self.kv is not None:
            self.kv.stats().waiting.clear()  # snapshots of samples aborted before they ran

    def counters(self) -> dict[str, Any]:
        """This engine's cumulative spec-decode counters as vLLM's Prometheus logger counts
        them (its own, not the process-wide registry's newest: see vllm_counters)."""
        return vllm_counters.spec_counters(self.engine)

    def close(self) -> None:
        """Release this engine's model, KV cache and drafters.

        vLLM's own shutdown of an in-process engine core ends with
        ``cleanup_dist_env_and_memory()``, which destroys the process's distributed groups
        that every other in-process vLLM engine (ours or anyone's) still uses. So this runs
        the local part of that shutdown only; the global part happens at process exit."""
        if self._closed:
            return
        self._closed = True
        core = getattr(self.engine.engine_core, "engine_core", None)
        if core is not None:
            if core.model_executor is not None:
                core.model_executor.shutdown()
            if core.scheduler is not None:
                core.scheduler.shutdown()
        if self.kv is not None:
            self.kv.close()
        gc.unfreeze()  # vLLM froze start-up objects; let the collector have them back
        self.proposer = self.recorder.proposer = None
        self.drafters.clear()

    # -- generation ---------------------------------------------------------------------------

    def submit(
        self,
        p: PromptInput,
        sampling: SamplingConfig,
        index: int,
        *,
        prefix_token_ids: Sequence[int] = (),
        kv: KVState | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue sample ``index`` of ``p``; :meth:`poll` returns it when it finishes.

        ``prefix_token_ids`` resumes a sample generated partly elsewhere (migration, fault
        recovery): they are appended to the prompt, so the target conditions on them exactly as
        if it had sampled them, and ``p.max_tokens`` must already be reduced by their count.
        ``kv``: the source's KV of that context (KV migration): vLLM loads it instead of
        prefilling; raises ValueError when it does not fit this engine (recompute instead).
        ``request_id``: the caller's name for the request (unique among its unfinished ones;
        the generation worker's is the sample id); by default a fresh one."""
        group = p.group_id or p.prompt_id
        prompt: Any
        plain_text = not prefix_token_ids and kv is None and not self.chat_template
        if isinstance(p.prompt, str) and plain_text and p.messages is None:
            prompt = p.prompt
        else:
            if p.messages is not None:
                ids = self.render_messages(p.messages)
            elif isinstance(p.prompt, str):
                ids = self.tokenize(p.prompt)
            else:
                ids = list(p.prompt)
            prompt = TokensPrompt(prompt_token_ids=[int(t) for t in [*ids, *prefix_token_ids]])
            if kv is not None:
                if self.kv is None:
                    raise ValueError("this engine was built without kv_migration")
                self.kv.deposit(prompt["prompt_token_ids"], kv)
        self._submitted += 1
        self.recorder.work_arrived()
        request_id = request_id or f"{self._submitted}:{p.prompt_id}/{index}"
        params = vllm_args.sampling_params(
            sampling, p, index,
            resumed_at=len(prefix_token_ids), group=group,
            end_of_turn_ids=self.end_of_turn_ids, detokenize=self.has_tokenizer,
        )  # fmt: skip
        self.engine.add_request(request_id, prompt, params)
        if sampling.top_logprobs:
            self._top_logprobs[request_id] = sampling.top_logprobs
        self._pending[request_id] = (p, index, len(prefix_token_ids))
        return request_id

    def poll(self) -> list[SampleResult]:
        """Run one engine step; return the samples that finished in it."""
        return list(self.poll_by_request().values())

    def poll_by_request(self) -> dict[str, SampleResult]:
        """:meth:`poll`, each sample under the request id :meth:`submit` returned for it."""
        if not self.engine.has_unfinished_requests():
            return {}
        done: dict[str, SampleResult] = {}
        for out in self._step():
            if out.finished and out.request_id in self._pending:
                p, j, prefix = self._pending.pop(out.request_id)
                done[out.request_id] = self._result(out, p, j, prefix)
        return done

    @property
    def running(self) -> int:
        """Requests submitted and not yet returned by :meth:`poll`."""
        return len(self._pending)

    def abort(self, request_ids: Sequence[str]) -> None:
        """Drop requests (their samples will not be returned)."""
        ids = [r for r in request_ids if self._pending.pop(r, None) is not None]
        for r in ids:
            self._top_logprobs.pop(r, None)
        if ids:
            self.engine.abort_request(ids)
        if not self.engine.has_unfinished_requests():
            self.recorder.ran_dry()

    def export_kv(self, request_id: str) -> KVState | None:
        """The KV a running request has computed so far (call before :meth:`preempt`); None
        without KV migration or before the request was scheduled."""
        if self.kv is None:
            return None
        processor = self.engine.output_processor
        for internal in [*processor.external_req_ids.get(request_id, ()), request_id]:
            state = self.kv.export(self.engine, internal)
            if state is not None:
                return state
        return None

    def generated_so_far(self, request_id: str) -> int:
        """Tokens a running request has produced (from vLLM's output state; 0 if unknown)."""
        state = step_stats.request_state(self.engine.output_processor, request_id)
        if state is None or state.detokenizer is None:
            return 0
        return len(state.detokenizer.output_token_ids)

    def preempt(self, request_id: str) -> tuple[list[int], list[float]]:
        """Abort a running request and return what it generated so far with the log-probs
        (migration: the destination resumes from exactly these tokens)."""
        tokens, logprobs = step_stats.request_progress(
            step_stats.request_state(self.engine.output_processor, request_id)
        )
        self.abort([request_id])
        return tokens, logprobs

    def _use_chat_template(self, mode: ChatTemplate) -> bool:
        if mode is ChatTemplate.OFF:
            return False
        template = self._template_text
        if mode is ChatTemplate.ON and not template:
            raise ValueError("dataset.chatTemplate is on but the policy's tokenizer has none")
        return bool(template)

    def tokenize(self, text: str) -> list[int]:
        """The token ids the engine feeds the policy for a prompt text: with the chat template
        on, one user turn rendered by the tokenizer's own template plus the assistant header
        (the template writes its special tokens itself, so none are added on top)."""
        if self.chat_template:
            return self.render_messages([{"role": "user", "content": text}])
        tokenizer = self.engine.get_tokenizer()
        return [int(t) for t in tokenizer.encode(text)]

    def render_messages(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """A chat prompt's token ids (``chat.render`` with the policy tokenizer)."""
        if not self.has_tokenizer or not self._template_text:
            raise ValueError("chat messages need the policy tokenizer's chat template")
        return chat.render(self.engine.get_tokenizer(), messages)

    def load_weights(self, model_dir: Path, version: int) -> None:
        """Replace the policy's weights with the HF checkpoint in ``model_dir`` (weight sync).

        Same path on CPU and GPU: vLLM's in-place reload (``Worker.reload_weights``), which
        restores kernel layouts first (vLLM-CPU repacks linear weights after loading, so a bare
        ``model.load_weights`` into the packed model fails), then a repack of the CPU kernels'
        copies of embeddings (``weight_sync``: without it a tied output head stays at the
        initial weights). The prefix cache is reset because cached prompt KV came from the
        old weights."""
        if self._pending:
            raise RuntimeError("weight sync with samples in flight would mix policy versions")
        files = sorted(str(f) for f in Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {model_dir}")
        self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        fault_point("mid_weight_load")
        self.engine.collective_rpc(weight_sync.refresh_packed_embeddings)
        self.engine.reset_prefix_cache()
        self.engine.set_weight_version(str(version))
        self.weight_version = version

    def load_draft(self, model_dir: Path, version: int) -> bool:
        """Draft with the refreshed draft model in ``model_dir`` from now on (between
        iterations, with the policy's weights). False when no draft_model drafter runs in
        the proposer (vLLM's native draft path loads its draft once, at start)."""
        drafter = self.drafters.get(DraftModelDrafter.name)
        if not isinstance(drafter, DraftModelDrafter):
            return False
        drafter.load_weights(model_dir)
        self.draft_version = version
        return True

    def generate(
        self, prompts: Sequence[PromptInput], sampling: SamplingConfig
    ) -> Iterator[SampleResult]:
        """Yield every sample as soon as it finishes (all samples of all prompts)."""
        mine = [self.submit(p, sampling, j) for p in prompts for j in range(p.n)]
        try:
            while self._pending:
                yield from self.poll()
        finally:
            self.abort(mine)  # the caller stopped early: free the engine for the next call

    def generate_all(
        self, prompts: Sequence[PromptInput], sampling: SamplingConfig
    ) -> list[SampleResult]:
        """All samples, in prompt order then sample index."""
        results = list(self.generate(prompts, sampling))
        order = {p.prompt_id: i for i, p in enumerate(prompts)}
        return sorted(results, key=lambda r: (order[r.prompt_id], r.sample_index))

    def _result(self, out: Any, p: PromptInput, j: int, prefix: int = 0) -> SampleResult:
        top = self._top_logprobs.pop(out.request_id, 0)
        return step_stats.sample_result(
            out, p, j, prefix=prefix, top=top, with_text=self.has_tokenizer
        )

    def _step(self) -> list[Any]:
        outputs = self.recorder.run(self.engine.step, self.engine.has_unfinished_requests)
        if self.native_schedule is not None and self.recorder.steps:
            lookup, step = self.dynamic_sd_lookup(), self.recorder.steps[-1]
            self.native_schedule.observe(step, lookup)
            # What vLLM drafts next, as the proposer path records its own next choice (the
            # worker's heartbeat reports it): the lookup's k for the rows still running.
            left = min(step.batch_size - step.num_finished, len(lookup) - 1)
            k = lookup[left] if left >= 1 else 0
            drafter = self.native_schedule.drafter if k else NO_DRAFT.drafter
            self.recorder.steps[-1] = dataclasses.replace(
                step, next_drafter=drafter, next_k=k, next_draft_tokens=k * max(left, 0)
            )
        return outputs

    @property
    def steps(self) -> list[StepRecord]:
        """Records of the steps run since the last :meth:`drain_steps`."""
        return self.recorder.steps

    def drain_steps(self) -> list[StepRecord]:
        return self.recorder.drain()
