"""``rlhfspec generate FILE.yaml --prompts P.jsonl --out O.jsonl``: offline rollouts.

Where it sits: beside local mode, for users who want rollouts without a job (offline data,
debugging a drafter, checking lossless speculation from outside). It builds ONE generation
engine exactly as a job's generation worker would from the manifest's ``generation`` section (same
dtype rule, chat template, drafters, drafting strategy and cost table), reads the prompts file the
way the job reads its dataset (``dataset.promptField``), and writes one JSON line per sample as it
finishes. Flags override the manifest for this run only; ``--speculative off`` runs the same engine
without speculation, for side-by-side comparisons.

Bad input (a manifest error, a model directory that is not one, a prompts row without the
prompt field) is one line naming the field or file:line, before any engine starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfspec_api.errors import FieldError
from rlhfspec_api.generation import EngineDType, SpeculativeMode
from rlhfspec_api.manifest import DocumentError, ManifestError, RLHFJob, load_rlhfjob, parse_rlhfjob
from rlhfspec_workers.data.rows import DatasetError, DatasetRow, read_rows

OUTPUT_FIELDS = (
    "prompt_id", "sample_index", "prompt_token_ids", "token_ids", "logprobs", "text",
    "finish_reason", "num_draft_tokens", "num_accepted_tokens",
)  # fmt: skip


class PromptsError(Exception):
    """The prompts file cannot be used; the message names the file and line."""


def read_prompts(path: Path, prompt_field: str) -> list[tuple[str, DatasetRow]]:
    """(prompt_id, row) per row, read by the job's own dataset reader (``data.rows``: string
    or chat prompts, nested fields, JSON lines or Parquet): ``id`` when the row has one,
    else ``p<row number>``. Every bad row is reported, by file and line."""
    if not path.is_file():
        raise PromptsError(f"--prompts: {path}: no such file")
    try:
        rows = read_rows(path, prompt_field, None, path_field="--prompts")
    except DatasetError as exc:
        raise PromptsError(
            "\n".join(f"{p.message} ({p.field}: {p.allowed})" for p in exc.problems)
        ) from None
    return [(str(r.metadata.get("id", f"p{r.index + 1}")), r) for r in rows]


def with_overrides(job: RLHFJob, args: argparse.Namespace) -> RLHFJob:
    """The job with this run's flags applied to ``spec.generation``, re-validated (a bad value
    is reported against the field it lands in, as in ``rlhfspec validate``)."""
    manifest = job.to_manifest()
    generation: dict[str, Any] = manifest["spec"].setdefault("generation", {})
    if args.temperature is not None:
        generation["temperature"] = args.temperature
    if args.max_new_tokens is not None:
        generation["maxNewTokens"] = args.max_new_tokens
    if args.dtype is not None:
        generation["dtype"] = args.dtype
    if args.speculative is not None:
        speculative = generation.setdefault("speculative", {})
        speculative["mode"] = args.speculative
        if args.speculative != SpeculativeMode.FIXED.value:
            speculative.pop("numDraftTokens", None)
    if args.samples is not None:
        manifest["spec"]["algorithm"]["samplesPerPrompt"] = args.samples
    if args.seed is not None:
        manifest["spec"]["algorithm"]["seed"] = args.seed
    return parse_rlhfjob(manifest)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfspec generate",
        description="Sample responses with one generation engine configured by a manifest.",
    )
    parser.add_argument("manifest", type=Path, help="an RLHFJob manifest")
    parser.add_argument("--prompts", type=Path, required=True,
                        help="JSON lines; the prompt is in dataset.promptField")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="JSON lines written here")
    parser.add_argument("--speculative", choices=[m.value for m in SpeculativeMode],
                        help="override generation.speculative.mode (off: plain)")  # fmt: skip
    parser.add_argument("--temperature", type=float, help="override generation.temperature")
    parser.add_argument("--max-new-tokens", type=int, help="override generation.maxNewTokens")
    parser.add_argument("--samples", type=int,
                        help="samples per prompt (default algorithm.samplesPerPrompt)")  # fmt: skip
    parser.add_argument("--seed", type=int, help="base seed (default algorithm.seed)")
    parser.add_argument("--dtype", choices=[d.value for d in EngineDType],
                        help="override generation.dtype")  # fmt: skip
    return parser


def _fail(lines: Sequence[str | FieldError]) -> int:
    for line in lines:
        print(f"[rlhfspec] {line}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        job = with_overrides(load_rlhfjob(args.manifest), args)
    except DocumentError as exc:
        return _fail([str(exc)])
    except ManifestError as exc:
        return _fail([f"{args.manifest}: {error}" for error in exc.errors])
    from rlhfspec_workers.preflight import check_models

    models, errors = check_models(job.spec, Path(job.spec.storage.path or "."))
    if errors:
        return _fail([f"{args.manifest}: {error}" for error in errors])
    try:
        prompts = read_prompts(args.prompts, job.spec.dataset.prompt_field)
    except PromptsError as exc:
        return _fail(str(exc).splitlines())
    return generate(job, models, prompts, args.out)


def generate(
    job: RLHFJob, models: dict[str, Path], prompts: Sequence[tuple[str, DatasetRow]], out: Path
) -> int:
    """Run the engine over every prompt and write the samples as they finish."""
    from rlhfspec_workers.hardware import resolve_engine_dtype

    from .adaptive import make_strategy
    from .engine import GenerationEngine
    from .native_setup import native_engine_args, native_strategy
    from .records import PromptInput, SamplingConfig
    from .worker import MAX_RUNNING, draft_model_paths

    spec = job.spec
    gen = spec.generation
    dtype = resolve_engine_dtype(gen.dtype)
    engine = GenerationEngine(
        gen,
        models["spec.models.policy"],
        draft_models=draft_model_paths(job, models),
        seed=spec.algorithm.seed,
        dtype=dtype,
        max_num_seqs=MAX_RUNNING,
        chat_template=spec.dataset.chat_template,
        **native_engine_args(gen, MAX_RUNNING),
    )
    samples = spec.algorithm.samples_per_prompt
    print(f"[rlhfspec] generate: {len(prompts)} prompts x {samples} samples, {dtype}, "
          f"speculative {gen.speculative.mode.value}", file=sys.stderr)  # fmt: skip
    try:
        batch = max(1, min(MAX_RUNNING, len(prompts) * samples))  # all of them at once
        if gen.speculative.native_execution:
            native_strategy(engine, gen, max_batch=batch)
        elif engine.proposer is not None:
            engine.set_strategy(make_strategy(engine, gen, log=_log, max_batch=batch))
        inputs = [
            PromptInput(
                row.prompt,
                prompt_id,
                n=samples,
                messages=[m.model_dump() for m in row.messages] if row.messages else None,
            )
            for prompt_id, row in prompts
        ]
        sampling = SamplingConfig.from_spec(gen, seed=spec.algorithm.seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        tokens = drafted = accepted = written = 0
        with out.open("w", encoding="utf-8") as sink:
            for result in engine.generate(inputs, sampling):
                row = {name: getattr(result, name) for name in OUTPUT_FIELDS}
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                written += 1
                tokens += len(result.token_ids)
                drafted += result.num_draft_tokens
                accepted += result.num_accepted_tokens
        seconds = time.perf_counter() - started
    finally:
        engine.close()
    rate = f"{accepted / drafted:.0%} of drafts accepted" if drafted else "no drafts"
    print(f"[rlhfspec] {written} samples, {tokens} tokens in {seconds:.1f}s "
          f"({tokens / max(seconds, 1e-9):.1f} tok/s), {rate}; wrote {out}",
          file=sys.stderr)  # fmt: skip
    return 0


def _log(line: str) -> None:
    print(f"[rlhfspec] {line}", file=sys.stderr, flush=True)
