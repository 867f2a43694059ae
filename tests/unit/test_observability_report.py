"""`rlhfspec report`: a small recorded run -> PNGs and a summary whose numbers are the JSONL's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfspec_cli.main import main as cli
from rlhfspec_workers.messages import IterationMetrics
from rlhfspec_workers.observability import plots, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("reward_kl.png", "stage_times.png", "throughput_k_batch.png", "worker_batch.png")


def recorded_run() -> list[IterationMetrics]:
    records = []
    for it in (1, 2, 3):
        trace = []
        for worker in (0, 1):
            batch = 8 - 2 * worker
            for s in range(6):
                # Worker 1 receives two migrated samples in iteration 2, after shrinking.
                batch += 2 if (it == 2 and worker == 1 and s == 4) else -1 if batch > 1 else 0
                trace.append([0.25 * s, worker, batch, 4 if batch < 5 else 1, 50.0 + 10 * s])
        records.append(
            IterationMetrics(
                iteration=it,
                total_iterations=4,
                samples=16,
                reward_mean=0.1 * it + 0.0123,
                reward_std=0.2 + 0.01 * it,
                kl=None if it == 1 else 0.00123 * it,
                policy_loss=0.5 - 0.1 * it,
                tokens=900 + it,
                tokens_per_second=300.0 + 1.25 * it,
                mean_accepted_length=1.5 + 0.25 * it,
                strategies={"draft_model:k=4": 9, "off:k=0": 3},
                migrations=2 if it == 2 else 0,
                reclaimed=1 if it == 3 else 0,
                stage_seconds={
                    "generation": 1.5 + it,
                    "inference": 0.5,
                    "training": 0.75,
                    "sync": 0.125,
                    "total": 2.875 + it,
                },
                weight_version=it,
                batch_trace=trace,
                draft_acceptance={"draft_model": 0.5 + 0.125 * it, "suffix": 0.25},
                draft_version=it - 1,
                draft_refresh_seconds=0.0 if it == 3 else 0.375,
            )
        )
    return records


def write_run(run_dir: Path, records: list[IterationMetrics]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r.model_dump(mode="json")) + "\n" for r in records))
    return path


def table(summary: str) -> list[dict[str, str]]:
    rows = [line.strip("|").split("|") for line in summary.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0]]
    return [dict(zip(header, (cell.strip() for cell in row), strict=True)) for row in rows[2:]]


def test_report_writes_every_plot_and_a_summary_equal_to_the_jsonl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    path = write_run(run_dir, recorded_run())
    assert cli(["report", str(run_dir)]) == 0
    out = run_dir / "report"
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    assert str(out / "summary.md") in capsys.readouterr().out

    summary = (out / "summary.md").read_text()
    rows = table(summary)
    jsonl = [json.loads(line) for line in path.read_text().splitlines()]
    assert [int(r["iteration"]) for r in rows] == [j["iteration"] for j in jsonl]
    for row, j in zip(rows, jsonl, strict=True):
        # The table shows each number rounded to its column's precision.
        assert row["reward mean"] == f"{j['reward_mean']:.3f}"
        assert row["reward std"] == f"{j['reward_std']:.3f}"
        assert row["KL"] == ("-" if j["kl"] is None else f"{j['kl']:.4f}")
        assert row["tokens/s"] == f"{j['tokens_per_second']:.1f}"
        assert row["accept length"] == f"{j['mean_accepted_length']:.2f}"
        assert int(row["migrations"]) == j["migrations"]
        assert int(row["reclaimed"]) == j["reclaimed"]
        assert int(row["samples"]) == j["samples"]
        for stage, seconds in j["stage_seconds"].items():
            assert row[f"{stage} s"] == f"{seconds:.2f}"
        assert row["strategy"] == "draft_model:k=4 (75%), off:k=0 (25%)"
        rates = j["draft_acceptance"]
        assert row["draft acceptance"] == f"draft_model {rates['draft_model']:.2f}, suffix 0.25"
        assert int(row["draft version"]) == j["draft_version"]
        assert row["draft refresh s"] == f"{j['draft_refresh_seconds']:.2f}"
    tokens = sum(j["tokens"] for j in jsonl)
    assert f"tokens generated: {tokens};" in summary
    assert "Iterations recorded: 3 of 4" in summary
    assert "migrations: 2;" in summary and "samples reclaimed: 1." in summary


def test_migration_arrivals_are_found_where_a_shrinking_batch_grows() -> None:
    points, windows = plots.timeline(recorded_run())
    assert [w.start for w in windows] == [0.0, 2.5, 6.0]  # generation stages end to end
    grew = {w: plots.arrivals(series) for w, series in plots.by_worker(points).items()}
    assert grew[0] == []  # iteration starts refill the batch: not arrivals
    assert [(p.iteration, p.batch) for p in grew[1]] == [(2, 4)]


def test_a_partial_run_without_trace_or_training_still_reports(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run(run_dir, [IterationMetrics(iteration=1, total_iterations=1, samples=2)])
    assert report.main([str(run_dir)]) == 0
    assert all((run_dir / "report" / name).is_file() for name in PLOTS)
    assert table((run_dir / "report" / "summary.md").read_text())[0]["reward mean"] == "-"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "metrics.jsonl:2: not JSON"),
        (
            '{"version": 1, "iteration": 0, "total_iterations": 1}',
            "metrics.jsonl:2: invalid iteration_metrics",
        ),
        ('{"kind": "rollout", "iteration": 2}', "metrics.jsonl:2: kind 'rollout'"),
        (
            '{"version": 1, "iteration": 2, "total_iterations": 3, "batch_trace": [[0.1, 0, 4]]}',
            "metrics.jsonl:2: batch_trace[0] has 3 values, expected 5 or 6",
        ),
    ],
    ids=["not-json", "invalid-field", "wrong-kind", "short-trace-row"],
)
def test_a_malformed_line_is_named_and_nothing_is_drawn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad_line: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    path = write_run(run_dir, recorded_run()[:1])
    path.write_text(path.read_text() + bad_line + "\n")
    assert report.main([str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (run_dir / "report").exists()


def test_missing_or_empty_metrics_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report.main([str(tmp_path / "nowhere")]) == 1
    assert "metrics.jsonl: cannot read" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert report.main([str(tmp_path)]) == 1
    assert "no iteration records" in capsys.readouterr().err


def test_job_and_redis_flags_need_each_other(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path), "--job", "ns/job"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path), "--from-redis", "redis://127.0.0.1:1/0"])
    assert exc.value.code == 2
    assert report.parse_job("team-a/grpo") == ("team-a", "grpo")
    assert report.parse_job("grpo") == ("default", "grpo")
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        report.parse_job("a/b/c")


def test_plotted_rate_is_the_token_counter_over_a_trailing_window() -> None:
    from rlhfspec_workers.observability.plots import (
        SMOOTHING_SECONDS,
        TracePoint,
        smoothed_rates,
    )

    # Tokens arrive in bursts (samples finish together): 0 for 4 s, then 400 at once.
    series = [
        TracePoint(1, t, 0, 8.0, 0.0, 0.0, tokens)
        for t, tokens in [(1.0, 0), (2.0, 0), (3.0, 0), (4.0, 0), (5.0, 400), (10.0, 400)]
    ]
    rates = smoothed_rates(series)
    assert rates[:4] == [0.0, 0.0, 0.0, 0.0]
    assert rates[4] == 400 / 4.0  # from t=1 (the stage's first row) to t=5
    assert rates[5] == 0.0  # nothing new in the trailing 5 s window (t=5..10)
    assert SMOOTHING_SECONDS == 5.0
    # Rows of another iteration never borrow this one's counter.
    nxt = TracePoint(2, 11.0, 0, 8.0, 0.0, 0.0, 50)
    assert smoothed_rates([*series, nxt])[-1] == 0.0
