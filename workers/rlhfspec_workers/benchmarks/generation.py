"""Generation benchmark: adaptive speculation against every baseline, side by side, one process.

Where it sits: ``rlhfspec bench generation`` (``benchmarks.cli``) and ``bench/generation.py``
call :func:`run_benchmark`; ``benchmarks.report`` prints the table and writes JSON and a PNG.

The workload is one RLHF generation batch of the tiny kit's sort-digits task: P prompts x n
samples at temperature 1, lengths long-tailed by nature (median ~8 tokens, a tail of wrong
answers running to max_tokens), so the running batch drains from P x n to a handful.
Configurations, all on the same target model:

* ``off``: an engine without speculation;
* ``k0``: the adaptive-proposer engine drafting nothing (its bookkeeping cost alone);
* ``fixed:<drafter>:<k>``: one strategy throughout (our proposer), for each drafter and k;
* ``dynsd-vllm``: vLLM's own draft model with Dynamic SD (``num_speculative_tokens_per_batch_size``)
  hand-tuned from the fixed-k profile; ``dynsd:<drafter>``: the same kind of schedule with our
  drafters;
* ``bandit``: TLT's bucketed epsilon-greedy bandit over the same strategies;
* ``ours``: the adaptive policy (calibrated cost model + online acceptance + selector);
* ``oracle``: the best measured strategy per batch bucket, in hindsight, from the profile.

A profile pass runs every fixed strategy once (it also warms everything up); learned
policies (bandit, ours) get one unmeasured warm-up run and keep learning across runs, as
they would across RL iterations. Then ``repeats`` rounds run every configuration in a
shuffled order; results are medians, reported as ratios (field notes 6: timing on a shared
machine is fragile).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlhfspec_api.generation import GenerationSpec
from rlhfspec_workers.generation.adaptive import build_adaptive_policy, calibrated_cost_model
from rlhfspec_workers.generation.cost_table import describe
from rlhfspec_workers.generation.engine import GenerationEngine
from rlhfspec_workers.generation.policy import (
    NO_DRAFT,
    BatchSizePolicy,
    DraftChoice,
    DraftPolicy,
    FixedPolicy,
)
from rlhfspec_workers.generation.records import SamplingConfig
from rlhfspec_workers.spec_decode.bandit import BanditSelector, strategy_set

from .policies import BanditPolicy, Profile, hand_tuned_schedule, oracle_schedule
from .workload import RunResult, Settings, auto_dtype, bench_spec, load_prompts

Log = Callable[[str], None]
DYNSD_RANGES = ((1, 4), (5, 16), (17, 64))
"""Batch ranges of the hand-tuned Dynamic SD schedules (plus one range above the last)."""


class Bench:
    """Engines, policies and the run loop of one benchmark."""

    def __init__(self, kit: Path, settings: Settings, log: Log = print) -> None:
        import torch

        self.settings, self.log, self.kit = settings, log, kit
        torch.set_num_threads(1)  # before any engine: vLLM then pins it (field notes 7)
        self.dtype = auto_dtype() if settings.dtype == "auto" else settings.dtype
        self.target = kit / "policy"
        if settings.target_size:
            from .target import TargetSize, scaled_target

            size = TargetSize.parse(settings.target_size)
            cache = kit.parent.parent / "bench-targets"
            self.target = scaled_target(kit / "policy", size, cache, seed=settings.seed)
        self.prompts = load_prompts(kit, settings)
        self.batch = settings.prompts * settings.samples
        self.sampling = SamplingConfig(
            temperature=settings.temperature, max_tokens=settings.max_tokens
        )
        self.engine_args: dict[str, Any] = {
            "max_num_seqs": max(self.batch, 1),
            "max_model_len": 128,
            "dtype": self.dtype,
            "seed": settings.seed,
            "kv_cache_bytes": max(256 << 20, self._kv_bytes()),
        }
        self.engines: dict[str, GenerationEngine] = {}
        self.policies: dict[str, DraftPolicy] = {}
        self.native: dict[str, list[tuple[int, int, int]]] = {}
        self.profile = Profile()
        self.results: list[RunResult] = []
        self.meta: dict[str, Any] = {"settings": _jsonable(asdict(settings)), "dtype": self.dtype}

    def _kv_bytes(self) -> int:
        cfg = json.loads((self.target / "config.json").read_text())
        per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"]
        width = 2 if self.dtype == "bfloat16" else 4
        return int(per_token * width * 128 * (self.batch + 16) * 1.2)

    # -- set-up -----------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        self.engines["off"] = GenerationEngine(
            GenerationSpec.model_validate({"speculative": {"mode": "off"}}),
            self.target,
            **self.engine_args,
        )
        spec = bench_spec(s.drafters, s.max_k)
        drafts = {i: self.kit / "draft" for i, d in enumerate(s.drafters) if d == "draft_model"}
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
        self.policies["k0"] = FixedPolicy(NO_DRAFT)
        for d in s.drafters:
            for k in s.ks:
                self.policies[f"fixed:{d}:{k}"] = FixedPolicy(DraftChoice(d, k))
        self.policies["bandit"] = BanditPolicy(
            BanditSelector(strategy_set(s.drafters, s.ks), seed=s.seed)
        )
        self.policies["ours"] = build_adaptive_policy(engine, spec, self.cost_model, k_values=s.ks)

    def profile_pass(self) -> None:
        """Every fixed strategy once: the hindsight profile, and everyone's warm-up."""
        self.run_config("off", -1)
        fixed = [n for n in self.policies if n == "k0" or n.startswith("fixed:")]
        for round_index in range(self.settings.profile_rounds):
            for name in fixed if round_index % 2 == 0 else reversed(fixed):
                result = self.run_config(name, -1)
                choice = self.policies[name].choose(1)
                self.profile.add((choice.drafter, choice.k), result.steps)
        oracle = oracle_schedule(self.profile, self.batch)
        self.policies["oracle"] = BatchSizePolicy(oracle)
        self.meta["oracle_schedule"] = oracle
        ranges = [*DYNSD_RANGES, (DYNSD_RANGES[-1][1] + 1, self.batch)]
        ranges = [(lo, hi) for lo, hi in ranges if lo <= self.batch]
        schedules = {
            d: hand_tuned_schedule(self.profile, d, ranges) for d in self.settings.drafters
        }
        self.meta["dynsd_schedules"] = schedules
        for d, rows in schedules.items():
            self.policies[f"dynsd:{d}"] = BatchSizePolicy([(lo, hi, d, k) for lo, hi, k in rows])
        if self.settings.native_dynsd and "draft_model" in self.settings.drafters:
            self._start_native("dynsd-vllm", "draft_model", schedules["draft_model"])
        for name in ("bandit", "ours"):
            self.run_config(name, -1)  # learned policies: one unmeasured warm-up iteration

    def _start_native(self, name: str, drafter: str, rows: list[tuple[int, int, int]]) -> None:
        # vLLM needs num_speculative_tokens >= 1 even when the schedule never drafts.
        max_k = max([k for _, _, k in rows] + [1])
        spec = bench_spec([drafter], max_k, native=True)
        self.engines[name] = GenerationEngine(
            spec,
            self.target,
            draft_models={0: self.kit / "draft"},
            native=True,
            per_batch_size=rows,
            **self.engine_args,
        )
        self.native[name] = rows
        self.run_config(name, -1)

    # -- runs -------------------------------------------------------------------------------

    @property
    def configs(self) -> list[str]:
        return ["off", *self.native, *self.policies]

    def run_config(self, name: str, round_index: int) -> RunResult:
        if name in self.engines and name != "proposer":
            engine = self.engines[name]
        else:
            engine = self.engines["proposer"]
            engine.set_policy(self.policies[name])
            suffix = engine.suffix
            if suffix is not None:  # every run starts from the same (empty) suffix index
                suffix.groups.clear()
                suffix.live.clear()
        engine.drain_steps()
        for p in self.prompts:
            for j in range(p.n):
                engine.submit(p, self.sampling, j)
        # The clock starts once every prompt is prefilled: prefill is the same work for every
        # configuration (nothing is drafted for it), and on a CPU it is as slow as a few dozen
        # decode steps of this batch, where on a GPU it is a few milliseconds; counting it
        # would only dilute every ratio towards 1.
        samples = []
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
        result = RunResult(
            name, round_index, seconds, cpu, tokens, len(samples), engine.drain_steps()
        )
        if round_index >= 0:
            self.results.append(result)
        self.log(
            f"  {'warm-up' if round_index < 0 else f'round {round_index}'} {name:<22} "
            f"{result.tokens_per_second:8.1f} tok/s {result.tokens_per_cpu_second:8.1f} tok/cpu-s "
            f"{seconds:6.2f}s  {len(result.steps)} steps"
        )
        return result

    def _prefill_steps(self, engine: GenerationEngine) -> int:
        budget = int(engine.engine.vllm_config.scheduler_config.max_num_batched_tokens)
        tokens = sum(len(engine.tokenize(str(p.prompt))) * p.n for p in self.prompts)
        return max(1, -(-tokens // budget))

    def measured_rounds(self) -> None:
        rng = random.Random(self.settings.seed)
        for r in range(self.settings.repeats):
            order = list(self.configs)
            rng.shuffle(order)
            for name in order:
                self.run_config(name, r)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    # -- results ----------------------------------------------------------------------------

    def medians(self, *, cpu: bool = False) -> dict[str, float]:
        by: dict[str, list[float]] = {}
        for r in self.results:
            by.setdefault(r.config, []).append(
                r.tokens_per_cpu_second if cpu else r.tokens_per_second
            )
        return {name: statistics.median(v) for name, v in by.items()}

    def representative(self, name: str) -> RunResult | None:
        """The run whose throughput is the config's median (for plots)."""
        runs = sorted(
            (r for r in self.results if r.config == name), key=lambda r: r.tokens_per_second
        )
        return runs[len(runs) // 2] if runs else None

    def to_json(self) -> dict[str, Any]:
        from .report import ratios, trace

        medians, cpu = self.medians(), self.medians(cpu=True)
        doc: dict[str, Any] = dict(self.meta)
        doc["target"] = str(self.target)
        doc["configs"] = {
            name: {
                "median_tokens_per_second": round(medians[name], 2),
                "median_tokens_per_cpu_second": round(cpu[name], 2),
                "runs": [r.summary() for r in self.results if r.config == name],
            }
            for name in medians
        }
        doc["ratios"] = ratios(medians)
        doc["ratios_cpu"] = ratios(cpu)
        doc["traces"] = {}
        for name in ("ours", "oracle", "bandit", "off", doc["ratios"]["best_fixed"]):
            run = self.representative(name) if name else None
            if run is not None:
                doc["traces"][name] = trace(run.steps)
        return doc


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def run_benchmark(kit: Path, settings: Settings, out_dir: Path, log: Log = print) -> dict[str, Any]:
    """Run everything, write ``generation.json`` and ``generation.png`` into ``out_dir``, and
    return the JSON document."""
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
    return doc
