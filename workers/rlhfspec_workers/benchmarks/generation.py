"""Generation benchmark: adaptive speculation against every baseline, side by side, one process.

Where it sits: ``rlhfspec bench generation`` (``benchmarks.cli``) and ``bench/generation.py``
call :func:`run_benchmark`; ``benchmarks.report`` prints the table and writes JSON and a PNG.

The workload is one RLHF generation batch: P prompts x n samples at temperature 1 of the tiny
kit's sort-digits task (median ~8 tokens, a tail of wrong answers running to max_tokens), so
the batch drains from P x n to a handful. Configurations, all on the same target model:

* ``off``: an engine without speculation;
* ``k0``: the adaptive-proposer engine drafting nothing (its bookkeeping cost alone);
* ``fixed:<drafter>:<k>``: one strategy throughout (our proposer), for each drafter and k;
* ``native:<drafter>:<k>``: vLLM's own drafter (draft model, else n-gram) at each fixed k, on
  vLLM's path: a static strategy too, and the best fixed configuration may be one of these;
* ``dynsd-vllm``: vLLM's own draft model with Dynamic SD (``num_speculative_tokens_per_batch_size``)
  hand-tuned from the fixed-k profile; ``dynsd:<drafter>``: the same kind of schedule with our
  drafters;
* ``bandit``: TLT's bucketed epsilon-greedy bandit over the same strategies;
* ``ours``: the adaptive strategy (calibrated cost model + online acceptance + selector);
* ``ours-native``: the same selector choosing only k, for vLLM's own drafter, its choice per
  batch size written into vLLM's Dynamic SD lookup after every step
  (``generation.native_schedule``): what the native path can carry of ours;
* ``bucket-oracle``: the best measured strategy per batch bucket, in hindsight, from the
  profile (a schedule, run like the others);
* ``oracle``: the true hindsight oracle (``benchmarks.hindsight_oracle``): per step, the best
  (drafter, k) given the acceptance each drafter really had at that step. Computed by replay
  from a shadow-drafting run, not run.

``Settings.model`` + ``Settings.dataset`` take any policy and chat dataset instead (SmolLM2 on
the arithmetic task, say). ``Settings.iterations`` revisits the same prompts, as RL epochs do:
every configuration's iteration i starts with the suffix drafters (``suffix``,
``suffix_tree``) holding the same rollouts of iteration i - 1 (those of the shadow run) and
nothing else, so history drafting is compared fairly.

A profile pass runs every fixed strategy once (and warms up); learned strategies (bandit,
ours) get one unmeasured warm-up run and keep learning across runs, as across RL iterations.
Then ``repeats`` rounds run every configuration, each iteration in a shuffled order, every
configuration of a round with the same per-sample seeds (``Bench.round_seed``); results
are medians over rounds, as ratios (timing on a shared machine: docs/cpu-notes.md §5).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhfspec_api.generation import GenerationSpec
from rlhfspec_workers.drafters.suffix import SuffixDrafter
from rlhfspec_workers.generation.adaptive import (
    CostLearner,
    build_adaptive_strategy,
    calibrated_cost_model,
)
from rlhfspec_workers.generation.cost_table import describe
from rlhfspec_workers.generation.draft_strategy import (
    NO_DRAFT,
    BatchSizeStrategy,
    DraftChoice,
    DraftStrategy,
    FixedStrategy,
)
from rlhfspec_workers.generation.engine import GenerationEngine
from rlhfspec_workers.generation.native_setup import native_strategy
from rlhfspec_workers.generation.records import SampleResult, SamplingConfig, StepRecord
from rlhfspec_workers.generation.shadow import ShadowDrafts
from rlhfspec_workers.spec_decode.bandit import BanditSelector, strategy_set
from rlhfspec_workers.spec_decode.cost_model import CostModel
from rlhfspec_workers.spec_decode.draft_choice import BatchRange

from .generation_document import document
from .hindsight_oracle import IterationTraces, iteration_traces
from .selector_replay import ReplayOptions
from .strategies import BanditStrategy, Profile, hand_tuned_schedule, oracle_schedule
from .workload import (
    RunResult,
    Settings,
    auto_dtype,
    bench_spec,
    kv_cache_bytes,
    load_dataset_prompts,
    load_prompts,
    max_model_len,
)

Log = Callable[[str], None]
DYNSD_RANGES = ((1, 4), (5, 16), (17, 64))
"""Batch ranges of the hand-tuned Dynamic SD schedules (plus one range above the last)."""


def _learning(
    engine: GenerationEngine, spec: GenerationSpec, own: CostModel, ks: tuple[int, ...]
) -> DraftStrategy:
    """``ours``: the adaptive strategy refining ``own`` (its copy of the table) from its steps."""
    return build_adaptive_strategy(engine, spec, own, k_values=ks, learner=CostLearner(own))


class Bench:
    """Engines, strategies and the run loop of one benchmark."""

    def __init__(self, kit: Path | None, settings: Settings, log: Log = print) -> None:
        import torch

        self.settings, self.log, self.kit = settings, log, kit
        torch.set_num_threads(1)  # before any engine: vLLM then pins it (docs/cpu-notes.md §1)
        self.dtype = auto_dtype() if settings.dtype == "auto" else settings.dtype
        self.draft: Path | None = settings.draft or (kit / "draft" if kit else None)
        if settings.model:
            from rlhfspec_workers.model_uris import resolve_builtin

            if settings.dataset is None:
                raise ValueError("--model needs --dataset (rows with a prompt and an answer)")
            self.target = resolve_builtin(settings.model) or Path(settings.model)
            self.scorer = self.target
            self.prompts = load_dataset_prompts(settings.dataset, settings)
        else:
            if kit is None:
                raise ValueError("the tiny-kit workload needs the kit")
            # The expectation oracle reads probabilities from ``scorer``: the embedding
            # target below computes exactly the tiny policy's logits, at many times its cost.
            self.target = self.scorer = kit / "policy"
            if settings.target_size:
                from .target import TargetSize, scaled_target

                size = TargetSize.parse(settings.target_size)
                cache = kit.parent.parent / "bench-targets"
                self.target = scaled_target(kit / "policy", size, cache, seed=settings.seed)
            self.prompts = load_prompts(kit, settings)
        if "draft_model" in settings.drafters and self.draft is None:
            raise ValueError("the draft_model drafter needs --draft")
        self.batch = settings.prompts * settings.samples
        self.sampling = SamplingConfig(
            temperature=settings.temperature, max_tokens=settings.max_tokens
        )
        self.max_model_len = max_model_len(self.target, self.prompts, settings)
        self.engine_args: dict[str, Any] = {
            "max_num_seqs": max(self.batch, 1),
            "max_model_len": self.max_model_len,
            "dtype": self.dtype,
            "seed": settings.seed,
            "kv_cache_bytes": kv_cache_bytes(
                self.target, self.dtype, self.max_model_len, self.batch
            ),
        }
        self.engines: dict[str, GenerationEngine] = {}
        self.strategies: dict[str, DraftStrategy] = {}
        self.native: dict[str, list[tuple[int, int, int]]] = {}
        self.learning: dict[str, DraftStrategy] = {}
        """Native configurations' strategies that learn from their steps (``ours-native``)."""
        self.profile = Profile()
        self.results: list[RunResult] = []
        self.profile_runs: list[tuple[str, list[StepRecord]]] = []
        self.shadows: list[IterationTraces] = []
        self.last_samples: list[SampleResult] = []
        self.history: list[dict[str, list[list[int]]]] = []
        """Per iteration: its shadow run's rollouts by prompt group (the next iteration's
        suffix history, the same for every configuration)."""
        self.meta: dict[str, Any] = {"settings": settings.to_json(), "dtype": self.dtype}

    # -- set-up -----------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        self.engines["off"] = GenerationEngine(
            GenerationSpec.model_validate({"speculative": {"mode": "off"}}),
            self.target,
            **self.engine_args,
        )
        spec = bench_spec(s.drafters, s.max_k, draft=str(self.draft))
        drafts = {
            i: self.draft
            for i, d in enumerate(s.drafters)
            if d == "draft_model" and self.draft is not None
        }
        self.engines["proposer"] = GenerationEngine(
            spec, self.target, draft_models=drafts, **self.engine_args
        )
        self.log(f"engines up in {time.perf_counter() - t0:.1f}s (dtype {self.dtype})")
        t0 = time.perf_counter()
        engine = self.engines["proposer"]
        self.cost_model = calibrated_cost_model(
            engine,
            s.calibration_cache,
            max_batch=self.batch,
            repeats=s.calibration_repeats,
            recalibrate=s.recalibrate,
            log=self.log,
        )
        self.meta["calibration_seconds"] = round(time.perf_counter() - t0, 1)
        self.meta["cost_table"] = describe(
            self.cost_model, sorted({1, 4, 16, 64, self.batch}), sorted({0, *s.ks})
        )
        self.strategies["k0"] = FixedStrategy(NO_DRAFT)
        for d in s.drafters:
            for k in s.ks:
                self.strategies[f"fixed:{d}:{k}"] = FixedStrategy(DraftChoice(d, k))
        self.strategies["bandit"] = BanditStrategy(
            BanditSelector(strategy_set(s.drafters, s.ks), seed=s.seed)
        )
        # As in a generation worker, ours refines its own copy of the cost table from the
        # steps it runs (CostLearner); the calibrated table stays as measured for the report.
        self.strategies["ours"] = _learning(engine, spec, copy.deepcopy(self.cost_model), s.ks)
        free = (n for n, d in engine.drafters.items() if getattr(d, "model_free", False))
        self.replay_options = ReplayOptions(engine.max_k, s.max_tokens, tuple(free))
        self.fresh_ours: Callable[[CostModel], DraftStrategy] = lambda model: _learning(
            engine, spec, copy.deepcopy(model), s.ks
        )

    def profile_pass(self) -> None:
        """Every fixed strategy once: the hindsight profile, and everyone's warm-up. Then one
        shadow-drafting run per iteration (the true oracle's traces, and the suffix history
        every configuration of the next iteration starts from)."""
        self.run_config("off", -1)
        fixed = [n for n in self.strategies if n == "k0" or n.startswith("fixed:")]
        for round_index in range(self.settings.profile_rounds):
            for name in fixed if round_index % 2 == 0 else reversed(fixed):
                result = self.run_config(name, -1)
                choice = self.strategies[name].choose(1)
                self.profile.add((choice.drafter, choice.k), result.steps)
                self.profile_runs.append((name, result.steps))
        for iteration in range(self.settings.iterations):
            self.shadow_run(iteration)
        oracle = oracle_schedule(self.profile, self.batch)
        self.strategies["bucket-oracle"] = BatchSizeStrategy(oracle)
        self.meta["bucket_oracle_schedule"] = oracle
        ranges = [*DYNSD_RANGES, (DYNSD_RANGES[-1][1] + 1, self.batch)]
        ranges = [(lo, hi) for lo, hi in ranges if lo <= self.batch]
        schedules = {
            d: hand_tuned_schedule(self.profile, d, ranges) for d in self.settings.drafters
        }
        self.meta["dynsd_schedules"] = schedules
        for d, rows in schedules.items():
            self.strategies[f"dynsd:{d}"] = BatchSizeStrategy(
                [BatchRange(lo, hi, d, k) for lo, hi, k in rows]
            )
        native = next((d for d in ("draft_model", "ngram") if d in self.settings.drafters), None)
        if self.settings.native_dynsd and native is not None:
            self._start_native("dynsd-vllm", native, schedules[native])
            self._start_native("ours-native", native, [(1, self.batch, max(self.settings.ks))])
            for k in self.settings.ks:  # the same drafter at fixed k on vLLM's own path
                self._start_native(f"native:{native}:{k}", native, [(1, self.batch, k)])
        for name in ("bandit", "ours"):
            self.run_config(name, -1)  # learned strategies: one unmeasured warm-up iteration

    def shadow_run(self, iteration: int, round_index: int = -1) -> None:
        """The plain-decoding pass with shadow drafting; ``round_index`` (negative: not a
        measured round) picks the batch's seeds."""
        engine = self.engines["proposer"]
        assert engine.proposer is not None
        shadow = ShadowDrafts() if self.settings.hindsight else None
        engine.proposer.shadow = shadow
        try:
            self.run_config("k0", round_index, iteration)
        finally:
            engine.proposer.shadow = None
        suffix = engine.drafters.get("suffix")
        tail = suffix.min_match if isinstance(suffix, SuffixDrafter) else 0
        groups: dict[str, list[list[int]]] = {}
        for sample in self.last_samples:
            tokens = [*sample.prompt_token_ids[len(sample.prompt_token_ids) - tail :]]
            groups.setdefault(sample.group_id, []).append([*tokens, *sample.token_ids])
        self.history.append(groups)
        if shadow is not None:
            live = engine.history_drafters
            history = self.history[iteration - 1] if iteration > 0 else None
            self.shadows.append(iteration_traces(shadow, live, self.settings.max_k, history))

    def _start_native(self, name: str, drafter: str, rows: list[tuple[int, int, int]]) -> None:
        # vLLM needs num_speculative_tokens >= 1 even when the schedule never drafts.
        max_k = max([k for _, _, k in rows] + [1])
        spec = bench_spec([drafter], max_k, native=True, draft=str(self.draft))
        self.engines[name] = GenerationEngine(
            spec,
            self.target,
            draft_models={0: self.draft} if drafter == "draft_model" and self.draft else {},
            native=True,
            per_batch_size=rows,
            **self.engine_args,
        )
        self.native[name] = rows
        if name == "ours-native":  # as a job with selector.execution native sets it up
            top = max(k for _, _, k in rows)
            native = bench_spec([drafter], top, draft=str(self.draft), execution="native")
            self.learning[name] = native_strategy(
                self.engines[name],
                native,
                max_batch=self.batch,
                cache_dir=self.settings.calibration_cache,
                write_back=False,
            )
        self.run_config(name, -1)

    # -- runs -------------------------------------------------------------------------------

    @property
    def configs(self) -> list[str]:
        return ["off", *self.native, *self.strategies]

    def run_config(self, name: str, round_index: int, iteration: int = 0) -> RunResult:
        if name in self.engines and name != "proposer":
            engine = self.engines[name]
        else:
            engine = self.engines["proposer"]
            engine.set_strategy(self.strategies[name])
            for drafter in engine.history_drafters:  # every run of an iteration starts
                drafter.clear()  # from the same index: the previous visit's rollouts
                if 0 < iteration <= len(self.history):
                    for group, sequences in self.history[iteration - 1].items():
                        drafter.add_history(group, sequences)
        engine.drain_steps()
        sampling = dataclasses.replace(self.sampling, seed=self.round_seed(round_index, iteration))
        for p in self.prompts:
            for j in range(p.n):
                engine.submit(p, sampling, j)
        # The clock starts once every prompt is prefilled: prefill is the same work for every
        # configuration (nothing is drafted for it), and on a CPU it is as slow as a few dozen
        # decode steps of this batch, where on a GPU it is a few milliseconds; counting it
        # would only dilute every ratio towards 1.
        samples: list[SampleResult] = []
        for _ in range(self._prefill_steps(engine)):
            samples += engine.poll()
        engine.drain_steps()
        started, cpu_started = time.perf_counter(), time.process_time()
        while engine.running:
            samples += engine.poll()
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        # Tokens sampled during decoding: every sample's first token came with its prefill.
        tokens = sum(len(r.token_ids) for r in samples) - self.batch
        steps = engine.drain_steps()
        learn = getattr(self.strategies.get(name, self.learning.get(name)), "observe_step", None)
        if learn is not None:  # after the clock: a worker does it inline, per step
            for step in steps:
                learn(step)
        result = RunResult(name, round_index, seconds, cpu, tokens, len(samples), steps, iteration)
        self.last_samples = samples
        if round_index >= 0:
            self.results.append(result)
        self.log(
            f"  {'warm-up' if round_index < 0 else f'round {round_index}'} it{iteration} "
            f"{name:<22} "
            f"{result.tokens_per_second:8.1f} tok/s {result.tokens_per_cpu_second:8.1f} tok/cpu-s "
            f"{seconds:6.2f}s  {len(result.steps)} steps"
        )
        return result

    def round_seed(self, round_index: int, iteration: int) -> int:
        """Common random numbers: every configuration of a round (and iteration) samples with
        the same per-sample seeds, as a job seeds every sample. Those that draft nothing (off,
        k0, ours while it chooses off) then do exactly the same work, token for token, and a
        drafting one samples the same distribution; the seeds change from round to round. With
        unseeded samples one configuration's tokens per run spread by ~12% on SmolLM2 (4,073
        to 5,115 tokens in 127 steps), larger than the gaps being measured."""
        return (self.settings.seed * 1_000_003 + (round_index + 2) * 1009 + iteration) & 0x7FFFFFFF

    def _prefill_steps(self, engine: GenerationEngine) -> int:
        budget = int(engine.engine.vllm_config.scheduler_config.max_num_batched_tokens)
        tokens = sum(
            len(
                engine.render_messages(p.messages)
                if p.messages is not None
                else engine.tokenize(str(p.prompt))
            )
            * p.n
            for p in self.prompts
        )
        return max(1, -(-tokens // budget))

    def measured_rounds(self) -> None:
        rng = random.Random(self.settings.seed)
        for r in range(self.settings.repeats):
            for iteration in range(self.settings.iterations):
                order = list(self.configs)
                rng.shuffle(order)
                for name in order:
                    self.run_config(name, r, iteration)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    # -- results ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The benchmark's JSON document (``generation_document``)."""
        return document(self)


def run_benchmark(
    kit: Path | None, settings: Settings, out_dir: Path, log: Log = print
) -> dict[str, Any]:
    """Run everything, write ``generation.json`` and ``generation.png`` into ``out_dir``, and
    return the JSON document."""
    from .hindsight_oracle import summary
    from .projection import summary as projection_summary
    from .report import plot, table

    bench = Bench(kit, settings, log)
    try:
        bench.start()
        bench.profile_pass()
        bench.measured_rounds()
        doc = bench.to_json()
    finally:
        bench.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "generation.json").write_text(json.dumps(doc, indent=1))
    plot(doc, out_dir / "generation.png")
    log(table(doc))
    if "oracle" in doc:
        from .oracle_curse import summary as curse_summary

        log("\n".join([*summary(doc["oracle"]), *curse_summary(doc["oracle"].get("curse"))]))
    if "expectation" in doc.get("oracle", {}):
        from .expectation_oracle import summary as expectation_summary

        log("\n".join(expectation_summary(doc["oracle"]["expectation"])))
    if "projections" in doc:
        log("\n".join(projection_summary(doc["projections"], doc["oracle"].get("ours_replayed"))))
    return doc
