"""The coordinator's record of finished iterations: one IterationMetrics row each, exactly once.

Where it sits: ``coordinator.loop`` appends a row per trained iteration with
:func:`append_row` and, when it starts, resumes after :func:`last_recorded_iteration` (not after
the last published weights: the iteration a killed coordinator was in may finish training
before the new process is up, and would then never get its row). The Redis metrics stream is
the record (Redis keeps it with an fsync per write); ``metrics.jsonl`` on the job's storage is
its copy, written after the stream. A coordinator killed between the two writes, or in the
middle of the file's line, leaves the file one row short or with a partial last line:
:func:`repair_metrics_file` completes it from the stream at the next start.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhfspec_workers.messages import IterationMetrics, Keys, WeightsPublished
from rlhfspec_workers.runtime import Bus


def recorded_rows(bus: Bus) -> list[IterationMetrics]:
    """Every row in the job's metrics stream, oldest first (one per trained iteration)."""
    # A row this version cannot read is a writer of another version's: its rows are its own.
    return [row for _, row in bus.history(bus.keys.metrics_stream, IterationMetrics)]


def last_recorded_iteration(rows: list[IterationMetrics]) -> int:
    """The last iteration with a row (0: none yet)."""
    return max((row.iteration for row in rows), default=0)


def _file_iterations(path: Path) -> set[int]:
    """Iterations with a complete row in ``path``; a partial last line (a writer killed
    mid-line) is cut off so the next append starts on a line of its own."""
    if not path.exists():
        return set()
    text = path.read_bytes()
    complete = text[: text.rfind(b"\n") + 1]
    if len(complete) != len(text):
        with path.open("r+b") as sink:
            sink.truncate(len(complete))
    found = set()
    for line in complete.decode(errors="replace").splitlines():
        try:
            found.add(int(json.loads(line)["iteration"]))
        except (ValueError, KeyError, TypeError):
            continue
    return found


def repair_metrics_file(path: Path | None, rows: list[IterationMetrics]) -> list[int]:
    """Append to ``path`` the stream's rows it lacks, in order; returns their iterations."""
    if path is None:
        return []
    present = _file_iterations(path)
    missing = [row for row in rows if row.iteration not in present]
    for row in missing:
        append_row(path, row)
    return [row.iteration for row in missing]


def append_row(path: Path, row: IterationMetrics) -> None:
    with path.open("a", encoding="utf-8") as sink:
        sink.write(json.dumps(row.model_dump(mode="json")) + "\n")


def weights_of(bus: Bus, iteration: int) -> WeightsPublished | None:
    """The trainer's WeightsPublished for exactly ``iteration``: the latest key when it is
    that one, else the weights log (every publication); None when not trained yet."""
    keys: Keys = bus.keys
    latest = bus.get(keys.weights, WeightsPublished)
    if latest is None or latest.iteration < iteration:
        return None
    if latest.iteration == iteration:
        return latest
    for _, message in reversed(bus.history(keys.weights_log, WeightsPublished)):
        if message.iteration == iteration:
            return message
    return latest  # not logged (a trainer killed between its two writes): the nearest
