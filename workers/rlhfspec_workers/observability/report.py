"""``rlhfspec report RUN_DIR``: a run's metrics JSONL -> PNG plots and a Markdown summary.

Where it sits: after a run. Local mode (``rlhfspec run``) writes ``RUN_DIR/metrics.jsonl``
(one :class:`IterationMetrics` per line, ``model_dump(mode="json")``); on a cluster the
coordinator appends the same records to the job's Redis metrics stream, which
``--from-redis URL --job NS/NAME`` copies into ``RUN_DIR/metrics.jsonl`` first. The plots are
drawn by :mod:`.plots`; this module reads, checks and summarises. Exit codes: 0 report
written, 1 unreadable or invalid records (the message names the line or stream entry),
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfspec_workers.messages import FIELD, IterationMetrics, Keys, MessageError

METRICS_FILE = "metrics.jsonl"
REPORT_DIR = "report"
SUMMARY_FILE = "summary.md"
STAGE_ORDER = ("generation", "inference", "training", "sync", "total")
TRACE_FIELDS = (
    "t_seconds", "worker_index", "running_batch", "k", "tokens_per_second", "tokens_so_far",
)  # fmt: skip
"""A batch_trace row; records written before ``tokens_so_far`` existed have the first five."""
TEXT_COLUMNS = ("strategy", "draft acceptance")


class ReportError(Exception):
    """Records that cannot be reported on; the message says where and why."""


def parse_line(text: str, where: str) -> IterationMetrics:
    """One JSONL line. Accepts the plain ``model_dump`` and the Redis form (with ``kind``)."""
    try:
        body: Any = json.loads(text)
    except ValueError as exc:
        raise ReportError(f"{where}: not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ReportError(f"{where}: expected a JSON object, got {type(body).__name__}")
    body.setdefault("kind", IterationMetrics.KIND)  # model_dump lines carry no kind
    try:
        record = IterationMetrics.from_bytes(json.dumps(body))
    except MessageError as exc:
        raise ReportError(f"{where}: {exc}") from None
    for index, row in enumerate(record.batch_trace):
        if len(row) not in (len(TRACE_FIELDS) - 1, len(TRACE_FIELDS)):
            raise ReportError(
                f"{where}: batch_trace[{index}] has {len(row)} values, expected "
                f"{len(TRACE_FIELDS) - 1} or {len(TRACE_FIELDS)} [{', '.join(TRACE_FIELDS)}]"
            )
    return record


def load_metrics(path: Path) -> list[IterationMetrics]:
    """Every record of ``path`` in file order (blank lines skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ReportError(f"{path}: cannot read: {exc.strerror or exc}") from None
    records = [
        parse_line(line, f"{path}:{number}")
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not records:
        raise ReportError(f"{path}: no iteration records")
    return records


def parse_job(text: str) -> tuple[str, str]:
    """``NS/NAME`` (or ``NAME`` in namespace ``default``) -> (namespace, name)."""
    namespace, _, name = text.rpartition("/")
    if not name or "/" in namespace:
        raise ValueError(f"--job {text!r}: expected NAMESPACE/NAME")
    return namespace or "default", name


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else value


def collect_from_redis(url: str, namespace: str, job: str, run_dir: Path) -> int:
    """Copy the job's metrics stream into ``run_dir/metrics.jsonl``; returns records copied."""
    import redis

    stream = Keys(namespace, job).metrics_stream
    try:
        client = redis.Redis.from_url(url)
    except ValueError as exc:
        raise ReportError(f"--from-redis {url!r}: {exc}") from None
    try:
        entries = client.xrange(stream)
    except redis.RedisError as exc:
        raise ReportError(f"{url}: cannot read stream {stream}: {exc}") from None
    finally:
        client.close()
    records: list[IterationMetrics] = []
    for entry_id, fields in entries or []:
        where = f"{stream} entry {_text(entry_id)}"
        raw = (fields or {}).get(FIELD)
        if raw is None:
            raise ReportError(f"{where}: no {FIELD.decode()!r} field")
        records.append(parse_line(_text(raw), where))
    if not records:
        raise ReportError(f"{url}: stream {stream} has no records (wrong --job?)")
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / METRICS_FILE).open("w", encoding="utf-8") as sink:
        for record in records:
            sink.write(json.dumps(record.model_dump(mode="json")) + "\n")
    return len(records)


def stage_names(records: Sequence[IterationMetrics]) -> list[str]:
    """Stages seen in any record: the loop's order first, unknown ones after, alphabetically."""
    seen = {stage for r in records for stage in r.stage_seconds}
    return [s for s in STAGE_ORDER if s in seen] + sorted(seen - set(STAGE_ORDER))


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mismatch_cell(mean: float | None, worst: float | None) -> str:
    """Rollout-vs-trainer log-prob mismatch per token, ``mean/max`` (``-`` when unknown)."""
    if mean is None or worst is None:
        return "-"
    return f"{mean:.1e}/{worst:.1e}"


def strategy_cell(strategies: dict[str, int]) -> str:
    """``drafter:k=K`` by engine steps, most used first (at most three, then the rest)."""
    if not strategies:
        return "-"
    total = sum(strategies.values()) or 1
    ranked = sorted(strategies.items(), key=lambda item: (-item[1], item[0]))
    cells = [f"{name} ({100 * steps / total:.0f}%)" for name, steps in ranked[:3]]
    if len(ranked) > 3:
        cells.append(f"+{len(ranked) - 3} more")
    return ", ".join(cells)


def acceptance_cell(acceptance: dict[str, float]) -> str:
    """Accepted / drafted tokens per drafter, ``name rate``, highest first (``-``: no drafts)."""
    ranked = sorted(acceptance.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{name} {rate:.2f}" for name, rate in ranked) or "-"


def draft_columns(records: Sequence[IterationMetrics]) -> tuple[bool, bool]:
    """(a draft model drafted in some iteration, it was refreshed in some iteration)."""
    return (
        any(r.draft_version is not None for r in records),
        any(r.draft_refresh_seconds > 0 for r in records),
    )


def summary_markdown(records: Sequence[IterationMetrics], source: str) -> str:
    stages = stage_names(records)
    versions, refreshes = draft_columns(records)
    header = [
        "iteration",
        "samples",
        "reward mean",
        "reward std",
        "KL",
        "logp mismatch mean/max",
        "eval accuracy",
        "tokens/s",
        "accept length",
        "draft acceptance",
        *(["draft version"] if versions else []),
        *(["draft refresh s"] if refreshes else []),
        "strategy",
        "migrations",
        "reclaimed",
        "weight version",
        *(f"{stage} s" for stage in stages),
    ]
    rows = [
        [
            str(r.iteration),
            str(r.samples),
            fmt(r.reward_mean),
            fmt(r.reward_std),
            fmt(r.kl, 4),
            mismatch_cell(r.logprob_mismatch_mean, r.logprob_mismatch_max),
            fmt(r.eval_accuracy, 3),
            fmt(r.tokens_per_second, 1),
            fmt(r.mean_accepted_length, 2),
            acceptance_cell(r.draft_acceptance),
            *([str(r.draft_version) if r.draft_version is not None else "-"] if versions else []),
            *([fmt(r.draft_refresh_seconds, 2)] if refreshes else []),
            strategy_cell(r.strategies),
            str(r.migrations),
            str(r.reclaimed),
            str(r.weight_version),
            *(fmt(r.stage_seconds.get(stage), 2) for stage in stages),
        ]
        for r in records
    ]
    tokens = sum(r.tokens for r in records)
    generation = sum(r.stage_seconds.get("generation", 0.0) for r in records)
    last = records[-1]
    lines = [
        "# RLHFSpec run report",
        "",
        f"Source: `{source}`. Iterations recorded: {len(records)} of {last.total_iterations}; "
        f"tokens generated: {tokens}; generation stage: {generation:.1f} s"
        + (f" ({tokens / generation:.1f} tokens/s overall)" if generation > 0 else "")
        + f"; migrations: {sum(r.migrations for r in records)}; "
        f"samples reclaimed: {sum(r.reclaimed for r in records)}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if h in TEXT_COLUMNS else "---:" for h in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "Plots: `reward_kl.png`, `stage_times.png`, `throughput_k_batch.png`, `worker_batch.png`.",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path, records: Sequence[IterationMetrics], source: str) -> list[Path]:
    """Render every plot and the summary into ``run_dir/report``; returns the files written."""
    from rlhfspec_workers.observability import plots

    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = plots.render_all(records, stage_names(records), out)
    summary = out / SUMMARY_FILE
    summary.write_text(summary_markdown(records, source), encoding="utf-8")
    return [*written, summary]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfspec report",
        description="Plot a run's metrics (RUN_DIR/metrics.jsonl) into RUN_DIR/report/.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    parser.add_argument(
        "--from-redis",
        metavar="URL",
        help="first copy the job's metrics stream from this Redis URL into RUN_DIR "
        "(e.g. redis://:PASSWORD@localhost:6379/0 through kubectl port-forward)",
    )
    parser.add_argument("--job", metavar="NS/NAME", help="the job whose stream to copy")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir
    try:
        if args.from_redis:
            if not args.job:
                parser.error("--from-redis needs --job NS/NAME")
            try:
                namespace, name = parse_job(args.job)
            except ValueError as exc:
                parser.error(str(exc))
            copied = collect_from_redis(args.from_redis, namespace, name, run_dir)
            print(
                f"[rlhfspec] copied {copied} record(s) of {namespace}/{name} into "
                f"{run_dir / METRICS_FILE}"
            )
        elif args.job:
            parser.error("--job needs --from-redis URL")
        path = run_dir / METRICS_FILE
        records = load_metrics(path)
        written = write_report(run_dir, records, str(path))
    except ReportError as exc:
        print(f"rlhfspec report: {exc}", file=sys.stderr)
        return 1
    for file in written:
        print(f"[rlhfspec] wrote {file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
