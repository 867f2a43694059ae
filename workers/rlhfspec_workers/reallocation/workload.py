"""Workloads for the simulator: samples with true lengths and their initial assignment.

Where it sits: the reallocation benchmark draws a batch (`synthetic_samples`, or a real run's
lengths) and assigns it to workers (`partition_samples`) before `simulator.simulate` replays a
policy on it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SimSample:
    """A sample with its true response length (tokens)."""

    sample_id: str
    length: int
    prompt_tokens: int = 0
    group_id: str | None = None

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be >= 1: {self}")


def synthetic_samples(
    groups: int,
    group_size: int = 8,
    *,
    seed: int = 0,
    median_length: float = 300.0,
    group_sigma: float = 0.9,
    sample_sigma: float = 0.5,
    max_tokens: int = 4096,
    prompt_tokens: int = 64,
) -> list[SimSample]:
    """Heavy-tailed, group-correlated response lengths: a lognormal scale per prompt group
    (some prompts invite long answers) times a lognormal per sample, clipped to max_tokens."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        scale = median_length * math.exp(rng.gauss(0.0, group_sigma))
        for j in range(group_size):
            length = scale * math.exp(rng.gauss(0.0, sample_sigma))
            out.append(
                SimSample(
                    f"g{g}-s{j}", int(min(max(length, 1.0), max_tokens)), prompt_tokens, f"g{g}"
                )
            )
    return out


Assignment = Literal["round_robin", "grouped", "skewed", "lpt"]


def partition_samples(
    samples: Sequence[SimSample], workers: int, how: Assignment = "grouped"
) -> list[list[SimSample]]:
    """Initial static assignment. round_robin: sample i -> worker i mod W. grouped: whole
    prompt groups dealt round-robin (siblings share a worker for prefix caching, so correlated
    lengths pile up). skewed: longest first in contiguous equal shares, so worker 0 holds the
    long tail (the benchmark's worst case). lpt: longest first, each to the worker with the
    fewest tokens so far, equal counts (an oracle that knows the lengths: a reference, not a
    policy)."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    parts: list[list[SimSample]] = [[] for _ in range(workers)]
    if how == "round_robin":
        for i, s in enumerate(samples):
            parts[i % workers].append(s)
    elif how == "grouped":
        groups: dict[str, list[SimSample]] = {}
        for s in samples:
            groups.setdefault(s.group_id or s.sample_id, []).append(s)
        for i, members in enumerate(groups.values()):
            parts[i % workers].extend(members)
    elif how == "skewed":
        ordered = sorted(samples, key=lambda s: -s.length)
        share = math.ceil(len(ordered) / workers)
        for i in range(workers):
            parts[i] = ordered[i * share : (i + 1) * share]
    elif how == "lpt":
        share = math.ceil(len(samples) / workers)
        tokens = [0] * workers
        for s in sorted(samples, key=lambda s: -s.length):
            i = min((j for j in range(workers) if len(parts[j]) < share), key=lambda j: tokens[j])
            parts[i].append(s)
            tokens[i] += s.length
    else:
        raise ValueError(f"unknown assignment {how!r}")
    return parts
