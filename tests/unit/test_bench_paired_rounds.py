"""``bench generation``'s round-by-round ratios: ours over each configuration within a round
(the same seeded batch), as quartiles, next to the ratio of medians."""

from __future__ import annotations

from rlhfspec_workers.benchmarks.generation_document import medians, paired
from rlhfspec_workers.benchmarks.report import ratios, table
from rlhfspec_workers.benchmarks.workload import RunResult


def run(config: str, round_index: int, seconds: float, tokens: int = 100) -> RunResult:
    return RunResult(config, round_index, seconds, seconds, tokens, 4)


def test_a_slow_round_moves_the_medians_apart_but_not_the_paired_ratio() -> None:
    # Ours is 1.25x the fixed configuration in every round; rounds 2 and 3 ran on a slow
    # machine (both configurations 2x slower), and in round 3 only ours had finished.
    results = [
        *(run("ours", r, s) for r, s in enumerate([0.8, 0.8, 1.6, 1.6])),
        *(run("fixed:draft_model:2", r, s) for r, s in enumerate([1.0, 1.0, 2.0])),
    ]
    by_median = medians(results)
    # Medians of unpaired rounds: ours takes its slow rounds' median, the fixed one does not.
    assert by_median["ours"] / by_median["fixed:draft_model:2"] != 1.25
    quartiles = paired(results)["fixed:draft_model:2"]
    assert quartiles == [1.25, 1.25, 1.25]
    assert paired(results)["ours"] == [1.0, 1.0, 1.0]


def test_quartiles_spread_with_the_rounds_and_the_table_prints_them() -> None:
    results = [
        *(run("ours", r, 1.0) for r in range(5)),
        *(run("off", r, s) for r, s in enumerate([1.2, 1.4, 1.6, 1.8, 2.0])),
    ]
    q1, q2, q3 = paired(results)["off"]
    assert q1 < q2 < q3
    assert q2 == 1.6
    doc_ratios = ratios(medians(results))
    doc_ratios["paired_ours_over"] = paired(results)
    doc = {
        "configs": {
            name: {
                "median_tokens_per_second": tps,
                "median_tokens_per_cpu_second": tps,
                "runs": [{"mean_accepted_length": None}],
            }
            for name, tps in medians(results).items()
        },
        "ratios": doc_ratios,
        "ratios_cpu": ratios(medians(results, cpu=True)),
    }
    off_line = next(line for line in table(doc).splitlines() if line.startswith("off"))
    assert f"1.600x ({q1:.2f}-{q3:.2f})" in off_line
