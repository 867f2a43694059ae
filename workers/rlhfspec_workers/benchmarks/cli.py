"""``rlhfspec bench ...``: command-line entry of the benchmarks.

Where it sits: the ``rlhfspec`` CLI delegates ``bench`` here with the arguments after it;
``bench/generation.py`` calls :func:`main` with ``generation`` prepended. Engine code is
imported only once a benchmark runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SELF_PARSING = {
    # Benchmarks that parse their own arguments: name (the module's, '-' for '_') -> help.
    "e2e": "whole RLHF iterations, speculation adaptive vs off",
    "reallocation": "sample reallocation between generation workers",
    "learning": "held-out accuracy: RLHFSpec vs a shuffled-reward control vs TRL's GRPOTrainer",
    "suffix": "our grouped suffix drafter vs Arctic Inference's SuffixDecoding, replayed",
    "chaos": "a tiny job under random SIGKILLs of every role: samples lost and duplicated (0)",
    "selector-batches": "ours, the oracles and fixed strategies replayed over many seeded batches",
    "draft-refresh": "GRPO with the draft model refreshed vs frozen vs no speculation",
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfspec bench", description="Run a benchmark.")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_text in SELF_PARSING.items():
        sub.add_parser(name, help=help_text, add_help=False)
    gen = sub.add_parser(
        "generation",
        help="adaptive speculative decoding vs off, fixed k, Dynamic SD, bandit, oracle",
    )
    gen.add_argument("--quick", action="store_true", help="small smoke run (about a minute)")
    gen.add_argument(
        "--model",
        help="policy to generate with: a path or zoo://NAME (default: the tiny kit's); "
        "with zoo://smollm2-135m-instruct the defaults are the arithmetic chat task",
    )
    gen.add_argument(
        "--dataset", type=Path, help="prompt rows (.jsonl/.parquet: prompt, answer) for --model"
    )
    gen.add_argument(
        "--draft", type=Path, help="draft model directory of the draft_model drafter (--model)"
    )
    gen.add_argument(
        "--iterations",
        type=int,
        help="visits of the same prompts (RL epochs; default 1): from the second, the suffix "
        "drafter also drafts from the previous visit's rollouts",
    )
    gen.add_argument(
        "--temperature", type=float, help="sampling temperature (default 1.0, as RL samples)"
    )
    gen.add_argument(
        "--no-hindsight", action="store_true", help="skip the true hindsight oracle's replay"
    )
    gen.add_argument(
        "--expectation-oracle",
        action=argparse.BooleanOptionalAction,
        help="also replay the expectation oracle, which knows each draft's acceptance in "
        "expectation (the ceiling of any causal selector; default on for the tiny kit, off "
        "with --model: it runs the target over every distinct draft)",
    )
    gen.add_argument(
        "--prompts",
        type=int,
        help="prompts in the batch (default 16: with 4 samples, 64 sequences sit as far past "
        "this CPU's compute knee as 256 sit on a GPU; see benchmarks.generation)",
    )
    gen.add_argument("--samples", type=int, help="samples per prompt (default 4)")
    gen.add_argument("--max-tokens", type=int, help="response cap (default 96)")
    gen.add_argument(
        "--repeats", type=int, help="measured rounds per configuration (default 10; --model 3)"
    )
    gen.add_argument(
        "--profile-rounds",
        type=_at_least_one,
        help="unmeasured runs of every fixed configuration before the measured rounds (default "
        "4, 1 with --model); the oracle and every replay are charged the step times of these "
        "and the measured rounds together, and fewer let timing noise into the oracle's edge",
    )
    gen.add_argument("--ks", type=_ints, help="draft lengths tried, e.g. 1,2,4,8 (default)")
    gen.add_argument(
        "--drafters", type=_names, help="drafters, e.g. suffix,ngram,draft_model (default)"
    )
    gen.add_argument(
        "--target-size",
        help="embed the tiny policy in a bigger target, HIDDENxLAYERS[xMLP] (default 512x8; "
        "'tiny': the 4.2M policy itself), so the target's step dwarfs the draft path's fixed "
        "cost; built in seconds, cached",
    )
    gen.add_argument("--dtype", default="auto", help="auto (bf16 where native, else fp32)")
    gen.add_argument("--no-native-dynsd", action="store_true", help="skip vLLM's own Dynamic SD")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--kit", type=Path, help="tiny-model kit directory (default: build/cached)")
    gen.add_argument("--calibration-cache", type=Path, help="cost-table cache directory")
    gen.add_argument(
        "--recalibrate", action="store_true", help="measure the cost table even if cached"
    )
    gen.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    gen.add_argument(
        "--cost-grid",
        type=Path,
        help="a verification grid measured elsewhere (bench/gpu_verify_grid.py): also replay "
        "the batches on its step costs and print the predicted ratios there",
    )
    return parser


REAL_MODEL_DEFAULTS = dict(
    # A real model on this CPU: 8 chat prompts x 8 samples (an RL group size), drafters that
    # need no draft model, responses up to 128 tokens, two visits of the prompts.
    prompts=8,
    samples=8,
    max_tokens=128,
    drafters=("suffix", "ngram"),
    ks=(1, 2, 4),
    target_size=None,
    iterations=2,
    repeats=3,
    profile_rounds=1,
    expectation_oracle=False,  # a forward of the real target per distinct draft: opt in
)
ARITHMETIC_EVAL = Path(__file__).resolve().parents[3] / "examples" / "data" / "arith-eval.jsonl"
"""The arithmetic task's held-out rows (``rlhfspec data make arithmetic``): the default
``--dataset`` of a ``--model`` run."""


def _workload_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The batch-shape flags both workloads take (None: not given)."""
    return {
        "prompts": args.prompts,
        "samples": args.samples,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "profile_rounds": args.profile_rounds,
        "ks": args.ks,
        "drafters": args.drafters,
    }


def _generation(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # vLLM's native n-gram proposer runs numba, whose thread pool (one thread per core by
    # default) then busy-waits beside every engine of the process: every run after the native
    # engine started used two cores (tok/cpu-s halved) and ran faster on the wall clock than
    # the runs before it. One numba thread keeps every configuration on one core.
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    from .generation import run_benchmark
    from .workload import Settings

    if args.model is not None:
        return _generation_model(args)
    base = (
        Settings(
            prompts=8,
            samples=2,
            max_tokens=24,
            repeats=1,
            ks=(1, 4),
            target_size=None,
            calibration_repeats=1,
            profile_rounds=1,
        )
        if args.quick
        else Settings()
    )
    given = {
        **_workload_flags(args),
        "target_size": None if args.target_size == "tiny" else args.target_size,
    }
    changes = {k: v for k, v in given.items() if v is not None or k == "target_size"}
    if args.target_size is None:
        del changes["target_size"]
    settings = dataclasses.replace(
        base,
        **changes,
        dtype=args.dtype,
        native_dynsd=not args.no_native_dynsd,
        seed=args.seed,
        calibration_cache=args.calibration_cache,
        recalibrate=args.recalibrate,
    )
    if args.iterations is not None:
        settings = dataclasses.replace(settings, iterations=args.iterations)
    if args.temperature is not None:
        settings = dataclasses.replace(settings, temperature=args.temperature)
    settings = dataclasses.replace(
        settings, hindsight=not args.no_hindsight, cost_grid=args.cost_grid
    )
    if args.expectation_oracle is not None:
        settings = dataclasses.replace(settings, expectation_oracle=args.expectation_oracle)
    if args.kit is not None:
        kit = args.kit
    else:
        from rlhfspec_workers.tinymodels import ensure_tiny_models

        kit = ensure_tiny_models(seed=0)
    return _finish(run_benchmark(kit, settings, args.out), args.out)


def _generation_model(args: argparse.Namespace) -> int:
    from .generation import run_benchmark
    from .workload import Settings

    numbers: dict[str, object] = dict(REAL_MODEL_DEFAULTS)
    if args.quick:
        numbers.update(prompts=2, samples=4, max_tokens=32, repeats=1, ks=(1, 4), iterations=2)
    given = {
        **_workload_flags(args),
        "iterations": args.iterations,
        "temperature": args.temperature,
        "expectation_oracle": args.expectation_oracle,
    }
    numbers.update({k: v for k, v in given.items() if v is not None})
    dataset = args.dataset or ARITHMETIC_EVAL
    settings = dataclasses.replace(
        Settings(),
        **numbers,  # type: ignore[arg-type]
        model=args.model,
        dataset=dataset,
        draft=args.draft,
        dtype=args.dtype,
        native_dynsd=not args.no_native_dynsd,
        seed=args.seed,
        calibration_cache=args.calibration_cache,
        recalibrate=args.recalibrate,
        hindsight=not args.no_hindsight,
        cost_grid=args.cost_grid,
    )
    kit = args.kit
    if kit is None and "draft_model" in settings.drafters and args.draft is None:
        from rlhfspec_workers.tinymodels import ensure_tiny_models

        kit = ensure_tiny_models(seed=0)
    return _finish(run_benchmark(kit, settings, args.out), args.out)


def _finish(doc: dict[str, object], out: Path) -> int:
    print(f"wrote {out / 'generation.json'} and {out / 'generation.png'}")
    configs = doc["configs"]
    assert isinstance(configs, dict)
    return 0 if all(c["median_tokens_per_second"] > 0 for c in configs.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SELF_PARSING:
        module = importlib.import_module(f"{__package__}.{argv[0].replace('-', '_')}")
        return int(module.main(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.benchmark == "generation":
        if args.cost_grid is not None:
            from .projection import load_grid

            try:
                load_grid(args.cost_grid)  # before a run of many minutes, not after it
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        return _generation(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
