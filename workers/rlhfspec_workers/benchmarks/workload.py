"""What the generation benchmark runs: its settings, the workload, and one run's result.

Where it sits: ``benchmarks.generation`` builds its engines from :class:`Settings`, feeds them
:func:`load_prompts` and keeps a :class:`RunResult` per run; ``benchmarks.report`` turns the
results into the table, JSON and PNG. No engine code here.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhfspec_api.generation import GenerationSpec
from rlhfspec_workers.generation.records import PromptInput, StepRecord
from rlhfspec_workers.hardware import resolve_engine_dtype


@dataclass(frozen=True)
class Settings:
    """One benchmark's knobs (defaults: the full run; ``cli --quick`` shrinks them)."""

    prompts: int = 16
    samples: int = 4
    max_tokens: int = 96
    slack: int = 4
    """Tokens a sample may run past its prompt's reference answer (see load_prompts)."""
    temperature: float = 1.0
    repeats: int = 10
    """Measured rounds. A tiny-bench run lasts under a second and identical work timed
    0.62-1.23x between rounds on a shared 2-core machine, so 3 rounds left ratios ~15% apart
    from one run to the next; 10 cost ~2 minutes more (a real model's default is 3)."""
    ks: tuple[int, ...] = (1, 2, 4, 8)
    drafters: tuple[str, ...] = ("suffix", "ngram", "draft_model")
    target_size: str | None = "512x8"
    """``HIDDENxLAYERS[xMLP]``: embed the tiny policy in a bigger target (benchmarks.target);
    None: the tiny policy itself."""
    dtype: str = "auto"
    native_dynsd: bool = True
    seed: int = 0
    calibration_cache: Path | None = None
    recalibrate: bool = False
    profile_rounds: int = 4
    """Runs of every fixed strategy behind the oracle's and the hand-tuned schedules (with the
    measured rounds, the step times every replay is charged: with fewer, more of the oracle's
    edge is timing noise, ``benchmarks.oracle_curse``)."""
    calibration_repeats: int = 2
    """Interleaved repeats of the cost grid (a worker start uses 1 to stay under a minute)."""
    model: str | None = None
    """A policy to generate with (a path or a ``zoo://``/``tiny://`` URI) instead of the tiny
    kit's; its prompts come from ``dataset``."""
    dataset: Path | None = None
    """JSON lines or Parquet rows (``prompt``: text or chat messages; ``answer``)."""
    draft: Path | None = None
    """The draft model of the ``draft_model`` drafter with ``model`` (the kit's by default)."""
    iterations: int = 1
    """Visits of the same prompts, as RL epochs make them: from the second on, the suffix
    drafter drafts from the previous visit's rollouts too."""
    hindsight: bool = True
    """Compute the true hindsight oracle (one shadow-drafting run per iteration)."""
    expectation_oracle: bool = True
    """Also replay the expectation oracle (``benchmarks.expectation_oracle``): a target
    forward per distinct draft of the shadow runs, seconds for the tiny kit, long for a real
    model, so ``--model`` runs leave it off unless asked."""
    cost_grid: Path | None = None
    """A verification grid measured elsewhere (``bench/gpu_verify_grid.py``): the batches are
    also replayed on its step costs (``benchmarks.projection``)."""

    @property
    def max_k(self) -> int:
        return max(self.ks)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (paths as strings, tuples as lists)."""
        return dict(_jsonable(asdict(self)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class RunResult:
    config: str
    round: int
    seconds: float
    cpu_seconds: float
    """This process's CPU time during the run: on a shared machine, time other processes
    take from us inflates wall time, much less CPU time (every engine runs one thread)."""
    tokens: int
    samples: int
    steps: list[StepRecord] = field(default_factory=list)
    iteration: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.tokens / self.cpu_seconds if self.cpu_seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        drafted = sum(s.num_draft_tokens for s in self.steps)
        accepted = sum(s.num_accepted_tokens for s in self.steps)
        drafts = sum(s.num_drafts for s in self.steps)
        per_pos = [0] * max((len(s.accepted_per_pos) for s in self.steps), default=0)
        for s in self.steps:
            for i, n in enumerate(s.accepted_per_pos):
                per_pos[i] += n
        return {
            "round": self.round,
            "iteration": self.iteration,
            "seconds": round(self.seconds, 4),
            "tokens": self.tokens,
            "tokens_per_second": round(self.tokens_per_second, 2),
            "cpu_seconds": round(self.cpu_seconds, 4),
            "tokens_per_cpu_second": round(self.tokens_per_cpu_second, 2),
            "steps": len(self.steps),
            "draft_tokens": drafted,
            "accepted_tokens": accepted,
            "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None,
            # A drafter's acceptance per position and per row verified, as the reallocation
            # simulator reads it for another machine (reallocation_grid).
            "accepted_per_pos": per_pos,
            "verified_rows": sum(s.batch_size for s in self.steps if s.k > 0),
            "expected_accepted": expected_against_accepted(self.steps),
        }


def expected_against_accepted(steps: Sequence[StepRecord]) -> dict[str, dict[str, float]]:
    """Per ``drafter:k`` the strategy chose: its steps, the draft tokens it expected them to
    get accepted (``StepRecord.next_expected_accepted``) and what the next step accepted.
    Whether the selector's acceptance estimates hold is read here, free of timing noise.
    Steps after which every row finished (nothing verified) are left out."""
    out: dict[str, dict[str, float]] = {}
    for made, verified in itertools.pairwise(steps):
        if made.next_expected_accepted < 0.0 or made.next_k < 1 or verified.num_drafts == 0:
            continue
        if (verified.drafter, verified.k) != (made.next_drafter, made.next_k):
            continue
        cell = out.setdefault(
            f"{made.next_drafter}:{made.next_k}",
            dict.fromkeys(("steps", "expected", "accepted"), 0.0),
        )
        cell["steps"] += 1
        cell["expected"] += made.next_expected_accepted
        cell["accepted"] += verified.num_accepted_tokens
    return {k: {n: round(v, 2) for n, v in c.items()} for k, c in sorted(out.items())}


def auto_dtype() -> str:
    """The engine dtype ``auto`` means here (``hardware.resolve_engine_dtype``): bf16 where
    computed natively, else fp32. Emulated bf16 matmuls run ~10x slower than fp32, which
    would put every step deep in a compute-bound regime no accelerator is in."""
    return resolve_engine_dtype("auto")


def load_prompts(kit: Path, settings: Settings) -> list[PromptInput]:
    """P prompts of the kit's held-out set at evenly spaced quantiles of answer length (the
    shortest to the longest), n samples each: the task's own long-tailed mix of problem
    sizes, deterministically. Each prompt's budget is its answer plus EOS plus ``slack``, so a
    wrong answer that never stops is cut near where a right one ends: sample lengths, and so
    the batch's drain, are nearly the same in every run (with a few dozen samples, whether
    one sample rambles to a large cap would otherwise decide the run time)."""
    from rlhfspec_workers.tinymodels.task import read_dataset_jsonl

    examples = sorted(
        read_dataset_jsonl(kit / "dataset" / "eval.jsonl"), key=lambda e: (len(e.answer), e.prompt)
    )
    picks = _evenly_spaced(len(examples), settings.prompts)
    return [
        PromptInput(
            examples[j].prompt,
            f"q{i}",
            n=settings.samples,
            max_tokens=min(settings.max_tokens, len(examples[j].answer) + 1 + settings.slack),
        )
        for i, j in enumerate(picks)
    ]


def _evenly_spaced(total: int, count: int) -> list[int]:
    """Indices of ``count`` (at most ``total``) items spread evenly over ``total`` sorted ones,
    first and last included."""
    count = min(count, total)
    return [round(i * (total - 1) / max(count - 1, 1)) for i in range(count)]


def load_dataset_prompts(path: Path, settings: Settings) -> list[PromptInput]:
    """P rows of ``path`` at evenly spaced quantiles of answer length (the task's mix of
    easy and hard problems, deterministically), n samples each, capped at ``max_tokens``:
    response lengths are the policy's own, long tail included, as in an RL iteration."""
    from rlhfspec_workers.data.rows import read_rows

    rows = sorted(
        read_rows(path, "prompt", "answer", path_field="--dataset"),
        key=lambda r: (len(r.answer or ""), r.index),
    )
    picks = _evenly_spaced(len(rows), settings.prompts)
    return [
        PromptInput(
            rows[j].prompt,
            f"q{i}",
            n=settings.samples,
            messages=None
            if rows[j].messages is None
            else [{"role": m.role, "content": m.content} for m in rows[j].messages or ()],
        )
        for i, j in enumerate(picks)
    ]


def bench_spec(
    drafters: Sequence[str],
    max_k: int,
    *,
    native: bool = False,
    draft: str = "tiny://draft",
    execution: str | None = None,
) -> GenerationSpec:
    """The benchmark's generation spec: adaptive over ``drafters`` (``execution``: the
    selector's, e.g. native), or fixed k for a native baseline engine."""

    def drafter(name: str) -> dict[str, Any]:
        return {
            "method": name,
            **({"model": {"path": draft}} if name == "draft_model" else {}),
        }

    speculative: dict[str, Any] = {
        "mode": "fixed" if native else "adaptive",
        "maxDraftTokens": max_k,
        "drafters": [drafter(d) for d in drafters],
    }
    if execution is not None:
        speculative["selector"] = {"execution": execution}
    return GenerationSpec.model_validate({"speculative": speculative})


def max_model_len(target: Path, prompts: Sequence[PromptInput], settings: Settings) -> int:
    """The engines' context: the longest prompt as the policy's tokenizer renders it, plus
    the response cap and a full draft (the tiny kit's workload: 128)."""
    if not settings.model:
        return 128
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target))
    longest = 0
    for p in prompts:
        if p.messages is not None:
            text = tokenizer.apply_chat_template(
                [dict(m) for m in p.messages], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            longest = max(longest, len(ids))
        else:
            longest = max(longest, len(tokenizer(str(p.prompt))["input_ids"]))
    return longest + settings.max_tokens + settings.max_k + 8


def kv_cache_bytes(target: Path, dtype: str, max_model_len: int, batch: int) -> int:
    """KV cache for the whole batch at full context (and 16 rows to spare), at least 256 MiB."""
    cfg = json.loads((target / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim
    width = 2 if dtype == "bfloat16" else 4
    return max(256 << 20, int(per_token * width * max_model_len * (batch + 16) * 1.2))
