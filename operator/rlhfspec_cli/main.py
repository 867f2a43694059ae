"""``rlhfspec`` entry point: dispatches sub-commands to the control or data plane.

Where it sits: the console script of the distribution. Control-plane commands (``crd``,
``validate``, ``render``) import only the contract and the operator's pure builders;
data-plane commands (``models``, ``run``) import ``rlhfspec_workers`` lazily, so the slim
operator image (no torch, no vllm) still runs the former. Exit codes: 0 success, 1 invalid
input or failed run, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhfspec_api.crd import render_crd_yaml
from rlhfspec_cli import render
from rlhfspec_cli.validate import validate_files


def _cmd_crd(args: argparse.Namespace) -> int:
    text = render_crd_yaml()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    return 0 if validate_files(args.files, sys.stdout, sys.stderr).ok else 1


# Commands implemented in other packages own their argument parsing; imported lazily so the
# slim operator image (no torch, no vllm) still runs the control-plane commands.
DELEGATED: dict[str, tuple[str, str]] = {
    "models": (
        "rlhfspec_workers.tinymodels.cli",
        "tiny kit and model zoo: `rlhfspec models build [--out DIR]`, `models fetch NAME`, "
        "`models convert FILE.gguf --out DIR`, `models distill-draft --policy P --out DIR`",
    ),
    "run": ("rlhfspec_workers.local.run", "run an RLHFJob manifest locally: `rlhfspec run FILE`"),
    "generate": (
        "rlhfspec_workers.generation.offline",
        "sample responses with one engine configured by a manifest: "
        "`rlhfspec generate FILE --prompts P.jsonl --out O.jsonl`",
    ),
    "data": (
        "rlhfspec_workers.data.cli",
        "make task datasets: `rlhfspec data make arithmetic --out F.jsonl [--eval-out E.jsonl]`",
    ),
    "worker": (
        "rlhfspec_workers.entrypoint",
        "run one worker of a job (what pods run): `rlhfspec worker ROLE`",
    ),
    "bench": ("rlhfspec_workers.benchmarks.cli", "benchmarks: `rlhfspec bench generation`"),
    "report": (
        "rlhfspec_workers.observability.report",
        "plots and summary: `rlhfspec report RUN_DIR`",
    ),
    "operator": (
        "rlhfspec_operator.main",
        "run the RLHFJob operator: `rlhfspec operator -n NAMESPACE | -A`",
    ),
}


def _delegate(command: str, rest: list[str]) -> int:
    import importlib

    module = importlib.import_module(DELEGATED[command][0])
    return int(module.main(rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfspec",
        description="Kubernetes-native RLHF with adaptive speculative decoding.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    crd = sub.add_parser("crd", help="print the RLHFJob CustomResourceDefinition")
    crd.add_argument("-o", "--output", help="write to this file instead of stdout")
    validate = sub.add_parser("validate", help="check RLHFJob manifests against the contract")
    validate.add_argument("files", nargs="+", metavar="FILE")
    render.add_arguments(sub.add_parser("render", help=render.HELP, description=render.HELP))
    for command, (_, help_text) in DELEGATED.items():
        sub.add_parser(command, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = parser.parse_args(argv)
    if args.command == "crd":
        return _cmd_crd(args)
    if args.command == "validate":
        return _cmd_validate(args)
    if args.command == "render":
        return render.run(args, sys.stdout, sys.stderr)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
