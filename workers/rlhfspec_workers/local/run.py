"""``rlhfspec run FILE``: run an RLHFJob manifest on this machine (local mode).

Where it sits: the README's main command. It parses the manifest once, runs preflight (models,
draft vocabularies, dataset rows) before anything starts, starts an embedded ``redis-server``,
then runs the job's iterations on one machine and writes ``metrics.jsonl`` in the run
directory, plus ``JobProgress`` to Redis the way the coordinator does on a cluster.

What runs today: the generation stage (real vLLM with the job's speculative configuration)
and the rule reward. The trainer and weight sync are not built yet, so the policy is not
updated between iterations; the command says so at the start and in every metrics record.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfspec_api.manifest import DocumentError, ManifestError, RLHFJob, load_rlhfjob
from rlhfspec_api.spec import RewardType
from rlhfspec_workers.local.redis_server import (
    RedisNotInstalledError,
    RedisServer,
    find_redis_server,
)
from rlhfspec_workers.messages import JobProgress, Keys
from rlhfspec_workers.preflight import PreflightError, ResolvedPaths, preflight

NOT_YET = "training stage not implemented yet: the policy is not updated between iterations"


def _fail(lines: Sequence[str]) -> int:
    for line in lines:
        print(line, file=sys.stderr)
    return 1


def _load_prompts(paths: ResolvedPaths, job: RLHFJob) -> list[str]:
    field = job.spec.dataset.prompt_field
    with paths.dataset.open(encoding="utf-8") as rows:
        return [json.loads(line)[field] for line in rows if line.strip()]


def _score(job: RLHFJob, prompt: str, text: str) -> float:
    if job.spec.reward.type is RewardType.RULE:
        from rlhfspec_workers.tinymodels import task

        return task.score(prompt, text)
    raise NotImplementedError("reward.type model needs the inference stage (not built yet)")


def run_job(job: RLHFJob, paths: ResolvedPaths, run_dir: Path, iterations: int | None) -> int:
    from rlhfspec_workers.generation.engine import GenerationEngine
    from rlhfspec_workers.generation.records import PromptInput, SamplingConfig, StepSummary

    spec = job.spec
    algo = spec.algorithm
    total = iterations or algo.iterations
    prompts = _load_prompts(paths, job)
    drafts = {
        i: paths.models[f"spec.generation.speculative.drafters[{i}].model"]
        for i in range(len(spec.generation.speculative.drafters))
        if f"spec.generation.speculative.drafters[{i}].model" in paths.models
    }
    print(f"[rlhfspec] {job.name}: starting vLLM (speculative {spec.generation.speculative.mode})")
    engine = GenerationEngine(
        spec.generation, paths.models["spec.models.policy"], draft_models=drafts, seed=algo.seed
    )
    redis_server = RedisServer(run_dir / "redis")
    redis_server.start()
    import redis

    client = redis.Redis.from_url(redis_server.url)
    keys = Keys(job.namespace, job.name)
    rng = random.Random(algo.seed)
    metrics_path = run_dir / "metrics.jsonl"
    print(f"[rlhfspec] {NOT_YET}")
    header = f"{'iter':>4} {'reward':>7} {'tok/s':>8} {'accept':>7} {'samples':>7} {'gen s':>6}"
    print(header)
    try:
        with metrics_path.open("a", encoding="utf-8") as sink:
            for iteration in range(1, total + 1):
                batch = rng.sample(prompts, min(algo.prompts_per_iteration, len(prompts)))
                inputs = [
                    PromptInput(
                        prompt=p, prompt_id=f"it{iteration}-p{i}", n=algo.samples_per_prompt
                    )
                    for i, p in enumerate(batch)
                ]
                # No per-request seed: vLLM-CPU's speculative path cannot rewind a seeded CPU
                # generator ("CPU Generator does not use offset"); the engine seed applies.
                sampling = SamplingConfig.from_spec(spec.generation)
                engine.steps.clear()
                started = time.perf_counter()
                results = engine.generate_all(inputs, sampling)
                seconds = time.perf_counter() - started
                by_id = {p.prompt_id: p.prompt for p in inputs}
                rewards = [_score(job, str(by_id[r.prompt_id]), r.text or "") for r in results]
                tokens = sum(len(r.token_ids) for r in results)
                # Tokens emitted per sequence per verification step (1.0: drafts never help).
                sequence_steps = sum(r.batch_size for r in engine.steps)
                record: dict[str, Any] = {
                    "iteration": iteration,
                    "reward_mean": sum(rewards) / len(rewards),
                    "samples": len(results),
                    "tokens": tokens,
                    "generation_seconds": seconds,
                    "tokens_per_second": tokens / seconds,
                    "mean_accepted_length": tokens / sequence_steps if sequence_steps else None,
                    "strategies": {
                        f"{d}:k={k}": n
                        for (d, k), n in StepSummary.of(engine.steps).by_strategy.items()
                    },
                    "policy_updated": False,
                }
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                progress = JobProgress(
                    iteration=iteration, total_iterations=total,
                    state="succeeded" if iteration == total else "running",
                    tokens_per_second=record["tokens_per_second"],
                    mean_accepted_length=record["mean_accepted_length"],
                    reward_mean=record["reward_mean"], updated_at=time.time(), message=NOT_YET,
                )
                client.set(keys.progress, progress.to_bytes())
                accept = record["mean_accepted_length"]
                print(f"{iteration:>4} {record['reward_mean']:>7.3f} "
                      f"{record['tokens_per_second']:>8.1f} "
                      f"{accept if accept is None else round(accept, 2)!s:>7} "
                      f"{len(results):>7} {seconds:>6.1f}")
                engine.new_iteration()
    finally:
        engine.close()
        redis_server.stop()
    print(f"[rlhfspec] done: metrics in {metrics_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhfspec run", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where metrics and Redis data go (default runs/<job name>)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="override spec.algorithm.iterations")
    args = parser.parse_args(argv)
    try:
        job = load_rlhfjob(args.manifest)
    except DocumentError as exc:
        return _fail([str(exc)])
    except ManifestError as exc:
        return _fail([f"{args.manifest}: {error}" for error in exc.errors])
    try:
        find_redis_server()
        paths = preflight(job.spec)
    except RedisNotInstalledError as exc:
        return _fail([str(exc)])
    except PreflightError as exc:
        return _fail([f"{args.manifest}: {error}" for error in exc.errors])
    run_dir = args.run_dir or Path("runs") / job.name
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Ctrl-C: KeyboardInterrupt unwinds through run_job's finally (engine, Redis stopped).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run_job(job, paths, run_dir, args.iterations)
    except KeyboardInterrupt:
        print("[rlhfspec] interrupted: engine and Redis stopped", file=sys.stderr)
        return 130
