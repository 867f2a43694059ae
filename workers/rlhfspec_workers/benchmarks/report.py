"""Benchmark output: the ratio table, the issue's targets, step traces and the PNG.

Where it sits: ``benchmarks.generation`` hands its medians and step records here; the table is
what ``rlhfspec bench generation`` prints, the JSON and PNG land next to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhfspec_workers.generation.records import StepRecord

OURS = "ours"
TARGETS = (
    # (label, baseline key in ratios, minimum ours/baseline)
    ("speculation off", "off", 2.0),
    ("best fixed k", "best_fixed", 1.1),
    ("vLLM Dynamic SD", "best_dynsd_vllm", 1.1),
    ("bandit (TLT)", "bandit", 1.1),
    ("hindsight oracle", "oracle", 0.95),
)


def _best(medians: Mapping[str, float], *prefixes: str) -> str | None:
    names = [n for n in medians if n.startswith(prefixes)]
    return max(names, key=lambda n: medians[n]) if names else None


def ratios(medians: Mapping[str, float]) -> dict[str, Any]:
    """ours / every configuration, plus which fixed strategy and which schedule were best."""
    ours = medians.get(OURS, 0.0)
    out: dict[str, Any] = {
        "ours_over": {n: round(ours / v, 3) if v > 0 else None for n, v in medians.items()},
        # A static strategy on either path: our proposer's, or vLLM's own drafter at fixed k.
        "best_fixed": _best(medians, "fixed:", "native:"),
        "best_dynsd": _best(medians, "dynsd"),
        "best_dynsd_vllm": _best(medians, "dynsd-vllm"),
    }
    checks = []
    for label, key, minimum in TARGETS:
        name = out.get(key) if key.startswith("best_") else key
        if not name or name not in medians or medians[name] <= 0:
            checks.append({"target": label, "baseline": name, "ratio": None, "min": minimum})
            continue
        ratio = ours / medians[name]
        checks.append(
            {
                "target": label,
                "baseline": name,
                "ratio": round(ratio, 3),
                "min": minimum,
                "met": ratio >= minimum,
            }
        )
    out["targets"] = checks
    return out


def trace(steps: Sequence[StepRecord]) -> dict[str, list[Any]]:
    """Per step: time since the run started, batch size, strategy verified, throughput."""
    t = 0.0
    out: dict[str, list[Any]] = {"t": [], "batch": [], "k": [], "drafter": [], "tps": []}
    for s in steps:
        t += s.step_seconds
        out["t"].append(round(t, 4))
        out["batch"].append(s.batch_size)
        out["k"].append(s.k)
        out["drafter"].append(s.drafter)
        tokens = s.batch_size + s.num_accepted_tokens
        out["tps"].append(round(tokens / s.step_seconds, 1) if s.step_seconds > 0 else 0.0)
    return out


def table(doc: Mapping[str, Any]) -> str:
    """Both metrics, best first by wall-clock throughput, then the issue's targets."""
    configs = doc["configs"]
    wall, cpu = doc["ratios"], doc["ratios_cpu"]
    width = max(len(n) for n in configs) + 2
    pairs = wall.get("paired_ours_over", {})
    lines = [
        f"{'configuration':<{width}}{'tok/s':>9}{'ours/this':>11}{'tok/cpu-s':>11}"
        f"{'ours/this':>11}{'runs':>6}{'accept len':>12}  ours/this by round (quartiles)"
    ]
    for name in sorted(configs, key=lambda n: -configs[n]["median_tokens_per_second"]):
        c = configs[name]
        lens = [x["mean_accepted_length"] for x in c["runs"] if x["mean_accepted_length"]]
        accept = f"{sorted(lens)[len(lens) // 2]:.2f}" if lens else "-"
        q = pairs.get(name)
        by_round = f"{q[1]:.3f}x ({q[0]:.2f}-{q[2]:.2f})" if q else "-"
        lines.append(
            f"{name:<{width}}{c['median_tokens_per_second']:>9.1f}"
            f"{_x(wall['ours_over'].get(name)):>11}"
            f"{c['median_tokens_per_cpu_second']:>11.1f}{_x(cpu['ours_over'].get(name)):>11}"
            f"{len(c['runs']):>6}{accept:>12}  {by_round}"
        )
    for label, ratios_ in (("wall clock", wall), ("CPU time", cpu)):
        lines.append(f"targets ({label}):")
        for check in ratios_["targets"]:
            if check["ratio"] is None:
                lines.append(f"  ours vs {check['target']:<18} (not run)")
                continue
            status = "met" if check["met"] else "MISSED"
            if check.get("identical_work"):
                status += " (identical work: the ratio is the machine's noise)"
            lines.append(
                f"  ours vs {check['target']:<18} {check['ratio']:.3f}x  (target >= "
                f"{check['min']:.2f}x, {check['baseline']}): {status}"
            )
    noise = doc.get("noise_floor")
    if noise:
        lines.append(
            f"noise floor: {', '.join(noise['configs'])} did identical work (the same tokens, "
            f"nothing drafted); their totals over all runs spread {noise['total_spread']:.3f}x, "
            f"one round's times up to {noise['round_spread_max']:.2f}x "
            f"(median {noise['round_spread_median']:.2f}x): nearer ratios are within noise"
        )
    for name, cells in doc.get("predictions", {}).items():
        shown = sorted(cells.items(), key=lambda kv: -kv[1]["steps"])[:6]
        lines.append(
            f"{name}'s acceptance predictions, accepted / expected draft tokens: "
            + ", ".join(f"{key} {c['ratio']:.2f} ({c['steps']:.0f} steps)" for key, c in shown)
        )
    return "\n".join(lines)


def _x(ratio: float | None) -> str:
    return f"{ratio:.3f}x" if ratio else "-"


def plot(doc: Mapping[str, Any], path: Path) -> None:
    """Batch size, chosen k and throughput over time of the representative runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces: Mapping[str, Mapping[str, list[Any]]] = doc["traces"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for name, tr in traces.items():
        style = {"linewidth": 2.0} if name == OURS else {"linewidth": 1.0, "alpha": 0.8}
        axes[0].plot(tr["t"], tr["batch"], label=name, **style)
        if name in (OURS, "bucket-oracle", "bandit"):
            axes[1].step(tr["t"], tr["k"], where="post", label=name, **style)
        axes[2].plot(tr["t"], _smooth(tr["tps"]), label=name, **style)
    ours_trace = traces.get(OURS)
    if ours_trace is not None:  # which drafter ours verified, step by step
        for drafter in sorted(set(ours_trace["drafter"])):
            points = [
                (t, k)
                for t, k, d in zip(
                    ours_trace["t"], ours_trace["k"], ours_trace["drafter"], strict=True
                )
                if d == drafter
            ]
            axes[1].scatter(
                [t for t, _ in points], [k for _, k in points], s=14, label=f"ours: {drafter}"
            )
    axes[0].set_ylabel("running batch")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("k verified")
    axes[2].set_ylabel("tokens/s (5-step mean)")
    axes[2].set_xlabel("seconds into the generation batch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    ours = doc["ratios"]["ours_over"]
    fig.suptitle(
        "generation benchmark: ours vs off "
        f"{ours.get('off') or 0:.2f}x, vs oracle {ours.get('oracle') or 0:.2f}x"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: Sequence[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out
