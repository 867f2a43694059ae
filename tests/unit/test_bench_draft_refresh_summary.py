"""``rlhfspec bench draft-refresh`` without engines: the summary and its ratios on hand-made
metrics rows, the arms' manifests, the round order, and the flags it refuses. (Not named
test_bench_draft_refresh.py: tests/integration has that basename, and the suite's test
modules share one namespace.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_workers.benchmarks import cli
from rlhfspec_workers.benchmarks.draft_refresh import (
    TASKS,
    arm_manifest,
    iteration_row,
    main,
    median_rows,
    rotated,
    summarise,
    table,
)
from rlhfspec_workers.benchmarks.trl_reference import GrpoSetup


def record(
    iteration: int,
    tps: float,
    generation: float,
    total: float,
    *,
    acceptance: float | None = None,
    version: int | None = None,
    refresh: float = 0.0,
) -> dict[str, Any]:
    """A metrics.jsonl row as the coordinator writes it (only what the bench reads, and a
    drafter it must ignore)."""
    drafters = {"suffix": 0.9}
    if acceptance is not None:
        drafters["draft_model"] = acceptance
    return {
        "iteration": iteration,
        "total_iterations": 2,
        "tokens": round(tps * generation),
        "tokens_per_second": tps,
        "stage_seconds": {"generation": generation, "training": 1.0, "total": total},
        "draft_acceptance": drafters,
        "draft_version": version,
        "draft_refresh_seconds": refresh,
        "mean_accepted_length": None,
        "reward_mean": 0.5,
    }


def rows(*records: dict[str, Any]) -> list[dict[str, Any]]:
    return [iteration_row(r) for r in records]


def test_iteration_row_reads_the_draft_models_figures() -> None:
    row = iteration_row(record(3, 100.0, 2.0, 5.0, acceptance=0.4, version=2, refresh=0.7))
    assert row["iteration"] == 3
    assert row["draft_acceptance"] == 0.4  # draft_model's, not suffix's 0.9
    assert row["draft_version"] == 2
    assert row["generation_tokens_per_second"] == 100.0
    assert row["generation_seconds"] == 2.0
    assert row["draft_refresh_seconds"] == 0.7
    assert row["total_seconds"] == 5.0
    # No draft_model drafter (the none arm): nothing to report, not 0.
    assert iteration_row(record(1, 50.0, 1.0, 2.0))["draft_acceptance"] is None


def test_medians_across_rounds_per_iteration() -> None:
    round_1 = rows(
        record(1, 100.0, 2.0, 5.0, acceptance=0.6, version=0, refresh=1.0),
        record(2, 120.0, 2.0, 4.0, acceptance=0.5, version=1, refresh=1.0),
    )
    round_2 = rows(
        record(1, 200.0, 1.0, 3.0, acceptance=0.4, version=0, refresh=3.0),
        record(2, 80.0, 4.0, 6.0, acceptance=0.7, version=2, refresh=2.0),
    )
    merged = median_rows([round_1, round_2])
    assert [r["iteration"] for r in merged] == [1, 2]
    assert merged[0]["generation_tokens_per_second"] == 150.0
    assert merged[0]["draft_acceptance"] == pytest.approx(0.5)
    assert merged[0]["draft_refresh_seconds"] == 2.0
    assert merged[1]["total_seconds"] == 5.0
    # Versions take the lower median: a version that ran, never 1.5.
    assert merged[1]["draft_version"] == 1


def test_summary_ratios_on_hand_made_rows() -> None:
    none = rows(record(1, 100.0, 4.0, 8.0), record(2, 100.0, 4.0, 8.0))
    frozen = rows(
        record(1, 200.0, 2.0, 6.0, acceptance=0.8, version=0),
        record(2, 100.0, 4.0, 8.0, acceptance=0.3, version=0),
    )
    refreshed = rows(
        record(1, 200.0, 2.0, 7.0, acceptance=0.8, version=0, refresh=1.0),
        record(2, 200.0, 2.0, 5.0, acceptance=0.8, version=1, refresh=1.0),
    )
    summary = summarise({"none": none, "frozen": frozen, "refreshed": refreshed})
    arms, ratios = summary["arms"], summary["ratios"]
    # Overall throughput is tokens over generation seconds, not a mean of rates:
    # frozen 400 + 400 tokens in 6 s.
    assert arms["frozen"]["generation_tokens_per_second"] == pytest.approx(800 / 6)
    assert arms["refreshed"]["generation_tokens_per_second"] == pytest.approx(200.0)
    assert arms["refreshed"]["draft_refresh_seconds"] == 2.0
    assert ratios["refreshed_vs_frozen"]["per_iteration"] == [1.0, 2.0]
    assert ratios["refreshed_vs_frozen"]["overall"] == pytest.approx(200 / (800 / 6))
    assert ratios["refreshed_vs_none"]["per_iteration"] == [2.0, 2.0]
    assert ratios["frozen_vs_none"]["per_iteration"] == [2.0, 1.0]
    assert ratios["frozen_vs_none"]["overall"] == pytest.approx((800 / 6) / 100)
    # Frozen spent 6 s generating, refreshed 4 s plus 2 s refreshing: it exactly breaks even.
    pays = ratios["refresh_pays"]
    assert pays["generation_seconds_saved"] == pytest.approx(2.0)
    assert pays["ratio"] == pytest.approx(1.0)
    # Only iteration 2 drafted with a refreshed draft (version 1): it saved 2 s of 2 spent.
    assert pays["fresh_iterations"] == [2]
    assert pays["fresh_generation_seconds_saved"] == pytest.approx(2.0)
    assert pays["fresh_ratio"] == pytest.approx(1.0)
    assert ratios["end_to_end_frozen_over_refreshed"] == pytest.approx(14 / 12)
    text = "\n".join(table(summary))
    assert "refresh pays:" in text and "= 1.00: does not pay for itself" in text
    assert "generation tok/s refreshed/frozen per iteration: 1.00 2.00; overall 1.50" in text


def test_summary_without_refresh_time_or_some_arms() -> None:
    frozen = rows(record(1, 100.0, 2.0, 4.0, acceptance=0.5, version=0))
    refreshed = rows(record(1, 50.0, 4.0, 6.0, acceptance=0.5, version=0))
    summary = summarise({"frozen": frozen, "refreshed": refreshed})
    ratios = summary["ratios"]
    assert set(ratios) == {"refreshed_vs_frozen", "refresh_pays",
                           "end_to_end_frozen_over_refreshed"}  # fmt: skip
    # Nothing refreshed: no ratio, rather than a division by zero or infinity.
    assert ratios["refresh_pays"]["ratio"] is None
    assert ratios["refresh_pays"]["generation_seconds_saved"] == -2.0
    assert ratios["refresh_pays"]["fresh_iterations"] == []
    assert ratios["refresh_pays"]["fresh_ratio"] is None
    assert "refresh_pays" not in summarise({"none": frozen, "frozen": frozen})["ratios"]
    assert table(summary)  # prints with missing figures


def test_rounds_rotate_the_arm_order() -> None:
    arms = ["none", "frozen", "refreshed"]
    assert rotated(arms, 0) == arms
    assert rotated(arms, 1) == ["frozen", "refreshed", "none"]
    assert rotated(arms, 3) == arms


def test_arm_manifests_differ_only_in_speculation(tmp_path: Path) -> None:
    setup = GrpoSetup(tmp_path / "policy", tmp_path / "train.jsonl", tmp_path / "eval.jsonl",
                      steps=3, prompts_per_step=4, group_size=2, seed=7)  # fmt: skip
    jobs = {arm: arm_manifest(TASKS["tiny"], setup, arm, "tiny://draft", 3, 5)
            for arm in ("none", "frozen", "refreshed")}  # fmt: skip
    specs = {arm: job["spec"] for arm, job in jobs.items()}
    for spec in specs.values():
        assert "eval" not in spec["dataset"]
        assert spec["algorithm"]["iterations"] == 3 and spec["algorithm"]["seed"] == 7
    assert specs["none"]["generation"]["speculative"] == {"mode": "off"}
    frozen = specs["frozen"]["generation"]["speculative"]
    assert frozen["mode"] == "fixed" and frozen["numDraftTokens"] == 3
    assert frozen["drafters"] == [{"method": "draft_model", "model": {"path": "tiny://draft"}}]
    fresh = specs["refreshed"]["generation"]["speculative"]
    assert fresh["drafters"][0]["refresh"] == {"every": 1, "steps": 5, "overlap": True}
    sync = arm_manifest(TASKS["tiny"], setup, "refreshed", "tiny://draft", 3, 5, overlap=False)
    assert sync["spec"]["generation"]["speculative"]["drafters"][0]["refresh"]["overlap"] is False
    without = {arm: {k: v for k, v in spec.items() if k != "generation"}
               for arm, spec in specs.items()}  # fmt: skip
    assert without["none"] == without["frozen"] == without["refreshed"]
    # Every arm is a valid RLHFJob (the refreshed one's refresh contract included).
    parsed = parse_rlhfjob(jobs["refreshed"])
    drafter = parsed.spec.generation.speculative.drafters[0]
    assert drafter.refresh is not None and drafter.refresh.every == 1
    assert drafter.refresh.steps == 5


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--model", "llama"], "--model"),
        (["--iterations", "1"], "--iterations"),
        (["--k", "0"], "--k"),
        (["--k", "9"], "--k"),
        (["--arms", "frozen,fresh"], "--arms"),
        (["--rounds", "0"], "--rounds"),
        (["--model", "smollm2"], "--draft"),
        (["--draft", "/nonexistent/draft"], "--draft"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"draft-refresh: {flag}:" in err


def test_registered_under_rlhfspec_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert "draft-refresh" in cli.SELF_PARSING
    assert cli.main(["draft-refresh", "--k", "0"]) == 2
    assert "--k: 0 is outside 1..8" in capsys.readouterr().err


def test_refresh_pays_also_counts_only_iterations_with_a_refreshed_draft() -> None:
    frozen = rows(
        record(1, 100.0, 3.0, 5.0, acceptance=0.6, version=0),
        record(2, 100.0, 4.0, 6.0, acceptance=0.4, version=0),
    )
    refreshed = rows(
        record(1, 150.0, 2.0, 5.0, acceptance=0.6, version=0, refresh=1.0),
        record(2, 130.0, 3.0, 5.0, acceptance=0.6, version=1),
    )
    pays = summarise({"frozen": frozen, "refreshed": refreshed})["ratios"]["refresh_pays"]
    # All iterations: 7 - 5 = 2 s saved for 1 s of refreshing. Iteration 1 drafted with the
    # same draft in both arms, so only iteration 2's 1 s is the refresh's doing.
    assert pays["ratio"] == pytest.approx(2.0)
    assert pays["fresh_iterations"] == [2]
    assert pays["fresh_ratio"] == pytest.approx(1.0)


def test_smollm2_arms_train_on_the_arithmetic_chat_task_with_the_given_draft(
    tmp_path: Path,
) -> None:
    setup = GrpoSetup(tmp_path / "policy", tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    draft = str(tmp_path / "draft")
    spec = arm_manifest(TASKS["smollm2"], setup, "refreshed", draft, 2, 16)["spec"]
    assert spec["models"]["policy"] == {"path": "zoo://smollm2-135m-instruct"}
    assert spec["reward"] == {"type": "rule", "rule": "math_answer"}
    assert spec["dataset"]["chatTemplate"] == "auto"
    (drafter,) = spec["generation"]["speculative"]["drafters"]
    assert drafter["model"] == {"path": draft} and drafter["refresh"]["every"] == 1
