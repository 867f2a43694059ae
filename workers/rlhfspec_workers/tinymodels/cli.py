"""``rlhfspec models build|fetch|convert``: the models a job runs on, from the command line.

Where it sits: the top-level CLI (``rlhfspec_cli``) delegates ``rlhfspec models ...`` here with
the arguments that follow ``models``.

- ``build`` trains the tiny-model kit. The same kit is also built lazily by
  ``ensure_tiny_models`` (tests, ``tiny://`` URIs); this command pre-builds it (e.g. in an image
  build) or builds it somewhere explicit.
- ``fetch NAME`` fetches and converts a zoo model into the cache (``zoo.ensure_zoo_model``, what
  ``zoo://NAME`` does lazily); progress goes to stderr, the directory is the last stdout line.
- ``convert FILE.gguf --out DIR`` converts a user's own GGUF the same way (``zoo.convert_gguf``).
- ``distill-draft --policy P --out DIR`` builds a draft from the policy's own layers and
  distils it on the policy's rollouts (``distill``).

Exit codes: 0 done (or already present), 1 the build, fetch or conversion failed (or the kit
misses its quality bar, or the GGUF is refused), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

# The kit is useless for speculative-decoding experiments below this draft agreement, and for
# RL when the policy is always or never right (checked only for the full, unscaled recipe).
MIN_DRAFT_AGREEMENT = 0.6
TEMP1_ACCURACY_RANGE = (0.2, 0.9)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfspec models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the tiny-model kit (policy, draft, reward, data)")
    build.add_argument(
        "--out",
        type=Path,
        default=None,
        help="kit directory (default: the cache dir $RLHFSPEC_CACHE/tiny-models/<recipe hash>)",
    )
    build.add_argument("--seed", type=int, default=0, help="build seed (default 0)")
    build.add_argument("--force", action="store_true", help="rebuild even if kit.json exists")
    build.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="scale every training stage (for smoke tests; < 1 gives a low-quality kit)",
    )
    build.add_argument("--quiet", action="store_true", help="no per-stage progress lines")
    fetch = sub.add_parser(
        "fetch", help="fetch a zoo model into the cache ($RLHFSPEC_CACHE/zoo/NAME)"
    )
    fetch.add_argument("name", help="zoo model name (as in zoo://NAME)")
    fetch.add_argument("--quiet", action="store_true", help="no progress lines")
    convert = sub.add_parser("convert", help="convert a GGUF file to an HF-format bf16 model dir")
    convert.add_argument("gguf", type=Path, metavar="FILE.gguf")
    convert.add_argument("--out", type=Path, required=True, help="new (or empty) model directory")
    convert.add_argument("--quiet", action="store_true", help="no progress lines")
    distill = sub.add_parser(
        "distill-draft",
        help="distil a small draft (same tokenizer) from a policy's own rollouts",
    )
    from rlhfspec_workers.distill.cli import add_arguments

    add_arguments(distill)
    return parser


def _stderr_log(quiet: bool) -> Callable[[str], None]:
    def log(line: str) -> None:
        if not quiet:
            print(f"  .. {line}", file=sys.stderr, flush=True)

    return log


def _fetch(name: str, quiet: bool) -> int:
    from rlhfspec_workers.zoo import UnknownZooModelError, ZooFetchError, ensure_zoo_model

    try:
        path = ensure_zoo_model(name, log=_stderr_log(quiet))
    except (UnknownZooModelError, ZooFetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _convert(gguf: Path, out: Path, quiet: bool) -> int:
    from rlhfspec_workers.zoo import UnsupportedGGUFError, convert_gguf

    try:
        report = convert_gguf(gguf, out, log=_stderr_log(quiet))
    except (UnsupportedGGUFError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the CLI reports any conversion failure as exit 1
        print(f"error: {gguf}: conversion failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` is what follows ``rlhfspec models`` (``build`` may be omitted)."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or (args_in[0].startswith("-") and args_in[0] not in ("-h", "--help")):
        args_in.insert(0, "build")
    try:
        args = _parser().parse_args(args_in)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    if args.command == "fetch":
        return _fetch(args.name, args.quiet)
    if args.command == "convert":
        return _convert(args.gguf, args.out, args.quiet)
    if args.command == "distill-draft":
        from rlhfspec_workers.distill.cli import run

        return run(args)
    if args.steps_scale <= 0:
        print("error: --steps-scale must be > 0", file=sys.stderr)
        return 2

    from rlhfspec_workers.tinymodels.build import build_tiny_models, default_kit_dir
    from rlhfspec_workers.tinymodels.recipe import TinyRecipe

    recipe = TinyRecipe()
    if args.steps_scale != 1.0:
        recipe = recipe.scaled(args.steps_scale)
    out = args.out if args.out is not None else default_kit_dir(args.seed, recipe)

    def log(line: str) -> None:
        if not args.quiet:
            print(f"  .. {line}", flush=True)

    try:
        report = build_tiny_models(out, seed=args.seed, force=args.force, recipe=recipe, log=log)
    except FileExistsError as exc:
        print(f"error: {exc} (use an empty or new directory)", file=sys.stderr)
        return 1
    except Exception as exc:  # the CLI reports any build failure as exit 1, not a traceback
        print(f"error: build failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"  kit             {out}")
    if args.steps_scale == 1.0:
        problems = []
        if report.draft_greedy_agreement < MIN_DRAFT_AGREEMENT:
            problems.append(f"draft agreement {report.draft_greedy_agreement:.3f} < 0.6")
        lo, hi = TEMP1_ACCURACY_RANGE
        if not lo <= report.target_temp1_accuracy <= hi:
            problems.append(f"target temp-1 accuracy outside [{lo}, {hi}]")
        if problems:
            print("error: kit misses its quality bar: " + "; ".join(problems), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
