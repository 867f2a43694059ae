"""The run report's figures: IterationMetrics records -> PNG files (matplotlib, no pyplot).

Where it sits: called by :func:`report.write_report`. Figures are built on
``matplotlib.figure.Figure`` directly, so no global backend or pyplot state is touched
(rendering goes through Agg because the files are PNG). Each function writes one file and
returns its path; a figure whose data was not recorded says so on the canvas instead of
failing, so the report of a partial run (no trainer yet, no trace) is still complete.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rlhfspec_workers.messages import IterationMetrics

DPI = 100


@dataclass(frozen=True)
class TracePoint:
    """One ``batch_trace`` sample placed on the run's generation timeline."""

    iteration: int
    t: float
    worker: int
    batch: float
    k: float
    tokens_per_second: float
    tokens_so_far: float | None = None
    """The worker's generated tokens since its stage started (rows that record it)."""


SMOOTHING_SECONDS = 5.0
"""Window of the plotted rate: tokens are counted when a sample finishes, so the per-row rate
is a train of bursts; the window shows the rate a user would read off a meter."""


def smoothed_rates(series: Sequence[TracePoint]) -> list[float]:
    """Each point's tokens/s over the trailing :data:`SMOOTHING_SECONDS` of its own stage
    (from the token counter when recorded, else the row's own rate). The window's tokens are
    the counter's difference, so the curve averages to the iteration's tokens/s."""
    rates: list[float] = []
    for i, point in enumerate(series):
        if point.tokens_so_far is None:
            rates.append(point.tokens_per_second)
            continue
        start_t, start_tokens = point.t, point.tokens_so_far
        for earlier in reversed(series[:i]):
            if earlier.iteration != point.iteration or earlier.tokens_so_far is None:
                break
            start_t, start_tokens = earlier.t, earlier.tokens_so_far
            if point.t - earlier.t >= SMOOTHING_SECONDS:
                break
        span = point.t - start_t
        rates.append((point.tokens_so_far - start_tokens) / span if span > 0 else 0.0)
    return rates


@dataclass(frozen=True)
class Window:
    """One iteration's generation stage on the timeline."""

    iteration: int
    start: float
    end: float
    migrations: int


def timeline(records: Sequence[IterationMetrics]) -> tuple[list[TracePoint], list[Window]]:
    """Lay the iterations' generation stages end to end (trace times are stage-relative)."""
    points: list[TracePoint] = []
    windows: list[Window] = []
    offset = 0.0
    for r in records:
        rows = [row for row in r.batch_trace if len(row) >= 5]
        span = max([r.stage_seconds.get("generation", 0.0), *(row[0] for row in rows)])
        windows.append(Window(r.iteration, offset, offset + span, r.migrations))
        points += [
            TracePoint(
                r.iteration,
                offset + row[0],
                int(row[1]),
                row[2],
                row[3],
                row[4],
                row[5] if len(row) > 5 else None,
            )
            for row in rows
        ]
        offset += span
    return points, windows


def by_worker(points: Sequence[TracePoint]) -> dict[int, list[TracePoint]]:
    out: dict[int, list[TracePoint]] = {}
    for p in sorted(points, key=lambda p: (p.worker, p.t)):
        out.setdefault(p.worker, []).append(p)
    return out


def arrivals(series: Sequence[TracePoint]) -> list[TracePoint]:
    """Points where a worker's batch grew after it had started shrinking in that stage.

    Within a generation stage a batch only shrinks as samples finish, once the worker has
    taken its share; growth after that means samples arrived: a migration or reclaimed
    samples. Each iteration starts afresh: its batch fills again first."""
    found: list[TracePoint] = []
    shrinking = False
    for prev, point in itertools.pairwise(series):
        if point.iteration != prev.iteration:
            shrinking = False
        elif point.batch < prev.batch:
            shrinking = True
        elif point.batch > prev.batch and shrinking and point.t > prev.t:
            found.append(point)
    return found


def _no_data(ax: Any, what: str) -> None:
    ax.text(
        0.5,
        0.5,
        f"{what} not recorded",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="gray",
    )


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def reward_kl(records: Sequence[IterationMetrics], path: Path) -> Path:
    fig = Figure(figsize=(8, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    rewarded = [r for r in records if r.reward_mean is not None]
    if rewarded:
        x = [r.iteration for r in rewarded]
        mean = [float(r.reward_mean or 0.0) for r in rewarded]
        top.plot(x, mean, marker="o", label="reward mean")
        spread = [r for r in rewarded if r.reward_std is not None]
        if spread:
            lo = [float(r.reward_mean or 0.0) - float(r.reward_std or 0.0) for r in spread]
            hi = [float(r.reward_mean or 0.0) + float(r.reward_std or 0.0) for r in spread]
            top.fill_between([r.iteration for r in spread], lo, hi, alpha=0.25, label="± std")
    evaluated = [r for r in records if r.eval_accuracy is not None]
    if evaluated:
        x = [r.iteration for r in evaluated]
        y = [float(r.eval_accuracy or 0.0) for r in evaluated]
        baseline = next((r.baseline_eval_accuracy for r in records
                         if r.baseline_eval_accuracy is not None), None)  # fmt: skip
        if baseline is not None:
            x, y = [0, *x], [baseline, *y]
        top.plot(x, y, marker="s", color="tab:green", label="held-out accuracy (greedy)")
    if rewarded or evaluated:
        top.legend(loc="best")
    else:
        _no_data(top, "reward")
    top.set_ylabel("reward / accuracy")
    top.set_title("Reward, held-out accuracy and KL per iteration")
    with_kl = [r for r in records if r.kl is not None]
    if with_kl:
        bottom.plot(
            [r.iteration for r in with_kl], [r.kl for r in with_kl], marker="o", color="tab:red"
        )
    else:
        _no_data(bottom, "KL")
    bottom.set_ylabel("KL to reference")
    bottom.set_xlabel("iteration")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def stage_times(records: Sequence[IterationMetrics], stages: Sequence[str], path: Path) -> Path:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    x = [r.iteration for r in records]
    parts = [s for s in stages if s != "total"]
    bottom = [0.0] * len(records)
    for stage in parts:
        heights = [r.stage_seconds.get(stage, 0.0) for r in records]
        ax.bar(x, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    totals = [
        (r.iteration, r.stage_seconds["total"]) for r in records if "total" in r.stage_seconds
    ]
    if totals:
        ax.plot(
            [t[0] for t in totals],
            [t[1] for t in totals],
            "k_",
            markersize=20,
            mew=2,
            label="total (wall)",
        )
    if not parts and not totals:
        _no_data(ax, "stage times")
    else:
        ax.legend(loc="best")
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("seconds")
    ax.set_title("Stage time per iteration")
    return _save(fig, path)


def throughput_k_batch(records: Sequence[IterationMetrics], path: Path) -> Path:
    points, _ = timeline(records)
    fig = Figure(figsize=(9, 10))
    tput, kax, scatter = fig.subplots(3, 1)
    if not points:
        for ax in (tput, kax, scatter):
            _no_data(ax, "batch trace")
        return _save(fig, path)
    workers = by_worker(points)
    batch_tput, batch_k = tput.twinx(), kax.twinx()
    for worker, series in workers.items():
        t = [p.t for p in series]
        color = f"C{worker % 10}"
        tput.plot(
            t,
            smoothed_rates(series),
            color=color,
            label=f"worker {worker} tokens/s ({SMOOTHING_SECONDS:.0f} s window)",
        )
        kax.step(t, [p.k for p in series], where="post", color=color, label=f"worker {worker} k")
        for twin in (batch_tput, batch_k):
            twin.plot(t, [p.batch for p in series], linestyle=":", alpha=0.6, color=color)
    tput.set_title("Generation throughput, chosen k and running batch over time")
    tput.set_ylabel("tokens/s")
    kax.set_ylabel("chosen k")
    for twin in (batch_tput, batch_k):
        twin.set_ylabel("running batch (dotted)")
    kax.set_xlabel("generation time (s, iterations end to end)")
    tput.legend(loc="upper right", fontsize="small")
    kax.legend(loc="upper right", fontsize="small")
    dots = scatter.scatter(
        [p.batch for p in points],
        [p.k for p in points],
        c=[p.tokens_per_second for p in points],
        cmap="viridis",
        alpha=0.7,
    )
    fig.colorbar(dots, ax=scatter, label="tokens/s")
    scatter.set_xlabel("running batch size")
    scatter.set_ylabel("chosen k")
    scatter.set_title("Chosen k against running batch (colour: throughput)")
    return _save(fig, path)


def worker_batch(records: Sequence[IterationMetrics], path: Path) -> Path:
    points, windows = timeline(records)
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    for w in windows:
        if w.migrations:
            ax.axvspan(w.start, w.end, color="tab:orange", alpha=0.12)
            ax.text(
                w.start,
                1.0,
                f" it{w.iteration}: {w.migrations} migrated",
                transform=ax.get_xaxis_transform(),
                va="top",
                fontsize="small",
            )
    for w in windows[1:]:
        ax.axvline(w.start, color="gray", linewidth=0.5)
    if not points:
        _no_data(ax, "batch trace")
    marked = False
    for worker, series in by_worker(points).items():
        ax.step(
            [p.t for p in series],
            [p.batch for p in series],
            where="post",
            color=f"C{worker % 10}",
            label=f"worker {worker}",
        )
        grew = arrivals(series)
        if grew:
            ax.plot(
                [p.t for p in grew],
                [p.batch for p in grew],
                "^",
                color="tab:red",
                label=None if marked else "samples arrived (migration)",
            )
            marked = True
    if points:
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("generation time (s, iterations end to end; gray lines: iteration starts)")
    ax.set_ylabel("running batch")
    ax.set_title("Running batch per generation worker (shaded: iterations with migrations)")
    return _save(fig, path)


def render_all(records: Sequence[IterationMetrics], stages: Sequence[str], out: Path) -> list[Path]:
    """Every figure of the report into ``out``; ``stages`` in stacking order."""
    return [
        reward_kl(records, out / "reward_kl.png"),
        stage_times(records, stages, out / "stage_times.png"),
        throughput_k_batch(records, out / "throughput_k_batch.png"),
        worker_batch(records, out / "worker_batch.png"),
    ]
