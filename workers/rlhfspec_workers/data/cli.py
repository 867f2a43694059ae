"""``rlhfspec data make TASK``: write a task's dataset files (JSON lines).

Where it sits: the ``rlhfspec`` CLI delegates ``data`` here with the arguments after it. The
files it writes are what an RLHFJob's ``dataset.path`` and ``dataset.eval`` name. One task so
far, ``arithmetic`` (:mod:`rlhfspec_workers.data.arithmetic`)::

    rlhfspec data make arithmetic --out train.jsonl --n 1000 --eval-out eval.jsonl --eval-n 64
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rlhfspec_workers.data import arithmetic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfspec data", description="Make task datasets.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    make = sub.add_parser("make", help="write a task's train (and eval) rows")
    tasks = make.add_subparsers(dest="task", required=True, metavar="TASK")
    arith = tasks.add_parser(
        "arithmetic",
        help="multi-step arithmetic word problems, chat prompts, answers after ####",
        description=arithmetic.__doc__.split("\n\n")[0] if arithmetic.__doc__ else None,
    )
    arith.add_argument("--out", type=Path, required=True, help="train rows (.jsonl)")
    arith.add_argument("--n", type=int, default=1000, help="train rows (default 1000)")
    arith.add_argument("--seed", type=int, default=0, help="same seed, same rows (default 0)")
    arith.add_argument("--eval-out", type=Path, help="held-out rows (.jsonl), no shared problem")
    arith.add_argument("--eval-n", type=int, default=64, help="held-out rows (default 64)")
    arith.add_argument(
        "--level",
        choices=sorted(arithmetic.LEVELS),
        default="small",
        help="small (default): numbers up to 40, sized for a ~135M chat model; large: up to 200",
    )
    return parser


def _summary(rows: Sequence[dict[str, object]]) -> str:
    ops = Counter(int(str(row["ops"])) for row in rows)
    return ", ".join(f"{ops[k]} with {k} op(s)" for k in sorted(ops))


def _make_arithmetic(args: argparse.Namespace) -> int:
    if args.n < 1 or (args.eval_out is not None and args.eval_n < 1):
        print("--n and --eval-n: at least 1 row", file=sys.stderr)
        return 2
    difficulty = arithmetic.LEVELS[args.level]
    splits: list[tuple[Path, int, arithmetic.Split]] = [(args.out, args.n, "train")]
    if args.eval_out is not None:
        splits.append((args.eval_out, args.eval_n, "eval"))
    for path, n, split in splits:
        try:
            rows = arithmetic.make_rows(n, args.seed, split, difficulty)
        except ValueError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 1
        arithmetic.write_jsonl(path, rows)
        print(f"wrote {path}: {len(rows)} {split} rows ({_summary(rows)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.action == "make" and args.task == "arithmetic":
        return _make_arithmetic(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
