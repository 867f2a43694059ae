"""``rlhfspec bench selector-batches``: the selector's decision quality over many batches.

Where it sits: ``rlhfspec bench selector-batches`` / its module. ``rlhfspec bench generation``
judges ``ours`` without timing noise by replaying it over the oracle's batch
(``selector_replay``), but that is one seeded batch per iteration: on the tiny bench one batch
moved ours' replayed ratios by several percent in either direction. This runs the generation
benchmark's set-up once (engines, calibrated cost table, the fixed configurations' profile
runs, whose step times every replay is charged), then ``--batches`` shadow runs, each a fresh
batch of the same prompts sampled with its own seed, and replays on all of them together:

- every fixed configuration and plain decoding;
- the true hindsight oracle (``spec_decode.hindsight.replay_oracle``);
- the expectation oracle (``expectation_oracle``): the ceiling of any causal selector;
- ``ours`` as a worker runs it, with drafts in hand (``spec_decode.in_hand``) and without.

No measured runs: every figure is a replay in the same currency (tokens per replayed
second), so the ratios between them carry no timing noise. Tiny kit only (the bench's
defaults, ``--target-size``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfspec_workers.generation.adaptive import AdaptiveStrategy

from .expectation_oracle import DraftProbabilities, expectation_report, knowledge_arms
from .generation import Bench
from .hindsight_oracle import (
    oracle_report,
    ours_versus_replays,
    priced_cost,
    ratio_of,
)
from .oracle_curse import summary as curse_summary
from .oracle_curse import winners_curse
from .selector_replay import replay_rounds
from .workload import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfspec bench selector-batches", description=__doc__)
    parser.add_argument("--batches", type=int, default=6, help="seeded shadow batches (6)")
    parser.add_argument("--rounds", type=int, default=3, help="replayed rounds of ours (3)")
    parser.add_argument(
        "--profile-rounds",
        type=int,
        help="runs of every fixed configuration, whose step times every replay is charged "
        "(default 8, 2 with --quick: with 2, a quarter of the oracle's edge was timing noise; "
        "see benchmarks.oracle_curse)",
    )
    parser.add_argument("--target-size", default="512x8", help="as bench generation's")
    parser.add_argument("--quick", action="store_true", help="a tiny batch, for tests")
    parser.add_argument("--kit", type=Path, help="tiny-model kit directory")
    parser.add_argument("--calibration-cache", type=Path, help="cost-table cache directory")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser


def shadow_batches(bench: Bench, batches: int) -> None:
    """``batches`` shadow runs of the bench's prompts, each sampled with its own seed."""
    for batch in range(batches):
        bench.shadow_run(0, round_index=-2 - batch)  # -1 is the bench's own shadow batch


def replay_report(bench: Bench, rounds: int) -> dict[str, Any]:
    s = bench.settings
    model = bench.cost_model
    cost = priced_cost(bench.profile_runs, model)
    options = bench.replay_options.with_drafting(bench.profile_runs, model)
    strategies = [(d, k) for d in s.drafters for k in s.ks]
    report = oracle_report(bench.shadows, cost, strategies, {})
    oracle, off = report["replayed_tokens_per_second"], report["replayed"]["k0"]
    ours: dict[str, Any] = {}
    for name, in_hand in (("ours", True), ("ours without drafts in hand", False)):
        strategy = bench.fresh_ours(bench.cost_model)
        if isinstance(strategy, AdaptiveStrategy):
            strategy.in_hand = in_hand
        run = replay_rounds(bench.shadows, cost, strategy, options, rounds=rounds)
        ours[name] = ours_versus_replays(run, report)
    report["ours_replayed"] = ours["ours"]
    best = ours["ours"]["best_fixed"]
    scorer = DraftProbabilities(bench.scorer, s.temperature)
    expectation = expectation_report(bench.shadows, cost, strategies, scorer, report)
    curse = winners_curse(bench.shadows, bench.profile_runs, model, strategies)
    return {
        "batches": len(bench.shadows),
        "curse": curse,
        "oracle": {"tokens_per_second": oracle, "over_off": ratio_of(oracle, off)},
        "expectation_oracle": expectation,
        "best_fixed": {"name": best, "tokens_per_second": report["replayed"][best]},
        "off": off,
        "ours": ours,
        "replayed_fixed": report["replayed"],
        "fixed_won": report["fixed_won"],
    }


def summary(doc: dict[str, Any]) -> list[str]:
    best = doc["best_fixed"]
    lines = [
        f"{doc['batches']} batches, every figure replayed (tokens per replayed second):",
        f"  true oracle          {doc['oracle']['tokens_per_second']:7.1f}"
        f"  {doc['oracle']['over_off']}x off",
        f"  expectation oracle   {doc['expectation_oracle']['tokens_per_second']:7.1f}"
        f"  {doc['expectation_oracle']['over_oracle']}x the true oracle (ours' ceiling)",
        "  expectation oracle, per-step acceptance known only for (the rest pooled): "
        + knowledge_arms(doc["expectation_oracle"]),
        f"  best fixed           {best['tokens_per_second']:7.1f}  ({best['name']})",
        f"  off                  {doc['off']:7.1f}",
    ]
    for name, row in doc["ours"].items():
        lines.append(
            f"  {name:<20} {row['tokens_per_second']:7.1f}  {row['over_oracle']}x oracle, "
            f"{row['over_best_fixed']}x best fixed, {row['over_off']}x off"
        )
    return [*lines, *curse_summary(doc.get("curse"))]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile_rounds = args.profile_rounds
    if profile_rounds is None:
        profile_rounds = 2 if args.quick else 8
    if args.batches < 1 or args.rounds < 1 or profile_rounds < 1:
        print(
            "rlhfspec bench selector-batches: --batches, --rounds and --profile-rounds must be >= 1"
        )
        return 2
    settings = dataclasses.replace(
        Settings(),
        target_size=args.target_size,
        calibration_cache=args.calibration_cache,
        profile_rounds=profile_rounds,
    )
    if args.quick:
        settings = dataclasses.replace(settings, prompts=2, samples=4, max_tokens=32, ks=(1, 4))
    if args.kit is not None:
        kit = args.kit
    else:
        from rlhfspec_workers.tinymodels import ensure_tiny_models

        kit = ensure_tiny_models(seed=0)
    bench = Bench(kit, settings, log=lambda _line: None)
    try:
        bench.start()
        bench.profile_pass()  # also the first shadow batch (the bench's own seed)
        shadow_batches(bench, args.batches - 1)
        doc = {"settings": settings.to_json(), **replay_report(bench, args.rounds)}
    finally:
        bench.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selector-batches.json").write_text(json.dumps(doc, indent=1))
    print("\n".join(summary(doc)))
    print(f"wrote {args.out / 'selector-batches.json'}")
    return 0
