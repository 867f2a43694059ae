"""``bench generation``'s round-by-round ratios: ours over each configuration within a round
(the same seeded batch), as quartiles, next to the ratio of medians."""

from __future__ import annotations

import dataclasses

from rlhfspec_workers.benchmarks.generation_document import medians, noise_floor, paired
from rlhfspec_workers.benchmarks.report import ratios, table
from rlhfspec_workers.benchmarks.workload import RunResult
from rlhfspec_workers.generation.records import StepRecord

PLAIN_STEP = StepRecord(
    step=0, batch_size=4, num_finished=0, drafter="off", k=0, num_drafts=0,
    num_draft_tokens=0, num_accepted_tokens=0, accepted_per_pos=(), drafted_per_pos=(),
    proposer_draft_tokens=-1, proposer_accepted_tokens=-1, next_drafter="off", next_k=0,
    next_draft_tokens=0, step_seconds=0.1, draft_seconds=0.0,
)  # fmt: skip


def run(
    config: str, round_index: int, seconds: float, tokens: int = 100, drafted: int = 0
) -> RunResult:
    steps = [dataclasses.replace(PLAIN_STEP, num_draft_tokens=drafted)]
    return RunResult(config, round_index, seconds, seconds, tokens, 4, steps)


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
    off_target = next(t for t in doc_ratios["targets"] if t["baseline"] == "off")
    off_target["identical_work"] = True
    printed = [line for line in table(doc).splitlines() if "ours vs speculation off" in line]
    assert "identical work" in printed[0] and "identical work" not in printed[1]


def test_the_noise_floor_is_the_spread_of_configurations_that_did_identical_work() -> None:
    results = [
        *(run("off", r, s) for r, s in enumerate([1.0, 1.2, 1.0])),
        *(run("k0", r, s) for r, s in enumerate([1.1, 1.0, 1.5])),
        # Ours drafted nothing and sampled what plain decoding did: identical work.
        *(run("ours", r, s) for r, s in enumerate([1.0, 1.0, 1.0])),
        # Drafted: other work, however alike its times.
        *(run("fixed:suffix:2", r, 1.0, drafted=8) for r in range(3)),
        # Nothing drafted but other tokens (it sampled differently): other work.
        *(run("bandit", r, 1.0, tokens=90) for r in range(3)),
    ]
    noise = noise_floor(results)
    assert noise is not None
    assert noise["configs"] == ["k0", "off", "ours"]
    assert noise["total_spread"] == round(3.6 / 3.0, 3)
    assert noise["round_spread_max"] == 1.5
    assert noise["round_spread_median"] == 1.2
    assert noise_floor([r for r in results if r.config in ("off", "fixed:suffix:2")]) is None
