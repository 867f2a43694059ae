"""The TRL reference arm of ``rlhfspec bench learning``: TRL's ``GRPOTrainer`` on one setup.

Where it sits: :mod:`.learning` runs RLHFSpec's loop, a shuffled-reward control and this, on
the same model, rows, reward, group size, prompts per step, token cap, learning rate, KL
coefficient and clip range, and compares held-out accuracy against wall seconds. Settings
mirror RLHFSpec's GRPO: one optimizer step per batch of ``prompts x group`` rollouts
(TRL's ``steps_per_generation`` = its gradient accumulation), the token-mean loss over that
batch (``loss_type="dapo"``), group-std-scaled advantages, k3 KL to the initial weights,
AdamW without weight decay, a constant learning rate, gradient norm clipped at 1, sampling at
temperature 1.0 with HF ``generate`` (no vLLM), fp32 on the CPU.

Accuracy is measured by :func:`.heldout.greedy_accuracy` (the evaluator of every arm) every
``eval_every`` steps; the wall seconds reported are training seconds only (evaluation excluded),
as in the RLHFSpec arm. Needs the ``bench`` extra (``trl``); imported only when this arm runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhfspec_workers.benchmarks.heldout import (
    SCORERS,
    EvalResult,
    EvalRow,
    greedy_accuracy,
    load_policy,
    read_eval_rows,
)
from rlhfspec_workers.hardware import available_cores


@dataclass(frozen=True)
class GrpoSetup:
    """One GRPO setup, shared by every arm of the learning benchmark."""

    model_dir: Path
    train_path: Path
    eval_path: Path
    steps: int = 8
    """Optimizer steps (RLHFSpec iterations): one per batch of rollouts."""
    prompts_per_step: int = 8
    group_size: int = 4
    max_new_tokens: int = 64
    learning_rate: float = 1e-5
    kl_coef: float = 0.01
    clip_range: float = 0.2
    temperature: float = 1.0
    seed: int = 0
    eval_every: int = 2
    eval_rows: int = 64
    eval_max_tokens: int | None = None
    """Held-out token cap (default ``max_new_tokens``)."""
    micro_batch_size: int = 8
    """Rows per forward/backward pass (a memory bound; the loss is a token mean over the whole
    step however it is cut): the job's ``microBatchSize`` and TRL's per-device batch size."""

    @property
    def micro_batch(self) -> int:
        """The micro-batch both arms use: ``micro_batch_size`` lowered until it divides the
        step's rollouts (TRL's gradient accumulation needs whole micro-batches)."""
        size = max(1, min(self.micro_batch_size, self.rollouts_per_step))
        while self.rollouts_per_step % size:
            size -= 1
        return size

    @property
    def eval_tokens(self) -> int:
        return self.eval_max_tokens or self.max_new_tokens

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class ArmResult:
    """What one arm measured: accuracy before/after and ``curve`` rows of
    ``[training wall seconds, step, held-out accuracy]``."""

    name: str
    before: float | None = None
    after: float | None = None
    curve: list[list[float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    reward_means: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    """Training wall seconds (evaluation excluded)."""
    total_seconds: float = 0.0
    """Everything: start-up, training and evaluation."""
    notes: list[str] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float | None:
        return sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds_per_step"] = self.seconds_per_step
        return out


def trl_reward(scorer: str, eos_ids: Sequence[int]) -> Callable[..., list[float]]:
    """A rule of :data:`.heldout.SCORERS` as a TRL reward function: the dataset's ``answer``
    column is the reference; a completion that did not end with EOS (cut at the token cap)
    scores 0, as in RLHFSpec's rule rewards."""
    eos = set(eos_ids)
    score = SCORERS[scorer]

    def reward(
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        answer: list[str],
        **_: Any,
    ) -> list[float]:
        scores = []
        for prompt, completion, ids, reference in zip(
            prompts, completions, completion_ids, answer, strict=True
        ):
            text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
            cut = not ids or ids[-1] not in eos
            scores.append(0.0 if cut else score(EvalRow(prompt, str(reference)), text))
        return scores

    reward.__name__ = scorer
    return reward


def _train_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            raw = json.loads(line)
            rows.append({"prompt": raw["prompt"], "answer": str(raw.get("answer", ""))})
    return rows


def run_trl(
    setup: GrpoSetup,
    out_dir: Path,
    scorer: str = "math_answer",
    before: float | None = None,
    log: Callable[[str], None] = print,
) -> ArmResult:
    """Train with TRL's GRPOTrainer for ``setup.steps`` steps, scoring the held-out rows
    every ``setup.eval_every`` steps (``before``: the initial weights' accuracy, if known)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.trainer.grpo_config import GRPOConfig
    from trl.trainer.grpo_trainer import GRPOTrainer

    # The bench sets OMP_NUM_THREADS=1 for the job's worker processes; TRL's one process
    # gets every core, as the job's trainer does.
    torch.set_num_threads(available_cores())
    started = time.perf_counter()
    torch.manual_seed(setup.seed)
    result = ArmResult("trl")
    model, tokenizer = load_policy(setup.model_dir)
    eval_rows = read_eval_rows(setup.eval_path, setup.eval_rows)

    def evaluate(step: int, train_seconds: float) -> EvalResult:
        res = greedy_accuracy(model, tokenizer, eval_rows, setup.eval_tokens, SCORERS[scorer])
        result.curve.append([train_seconds, float(step), res.accuracy])
        log(f"[trl] step {step}: held-out accuracy {res.accuracy:.3f} "
            f"({res.cut_fraction:.0%} cut, {res.seconds:.0f}s to evaluate)")  # fmt: skip
        return res

    result.before = evaluate(0, 0.0).accuracy if before is None else before
    if before is not None:
        result.curve.append([0.0, 0.0, before])
    config = GRPOConfig(
        output_dir=str(out_dir / "trl"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=setup.seed,
        max_steps=setup.steps,
        # One optimizer step per generation batch, cut into the job's micro-batches.
        per_device_train_batch_size=setup.micro_batch,
        gradient_accumulation_steps=setup.rollouts_per_step // setup.micro_batch,
        num_generations=setup.group_size,
        max_completion_length=setup.max_new_tokens,
        temperature=setup.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=setup.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=setup.kl_coef,
        epsilon=setup.clip_range,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    class Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.step_started = 0.0
            self.train_seconds = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.step_started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seconds = time.perf_counter() - self.step_started
            result.step_seconds.append(seconds)
            self.train_seconds += seconds
            step = int(state.global_step)
            log(f"[trl] step {step}/{setup.steps}: {seconds:.1f}s")
            if step % setup.eval_every == 0 or step == setup.steps:
                result.after = evaluate(step, self.train_seconds).accuracy

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "reward" in logs:
                result.reward_means.append(float(logs["reward"]))

    clock = Clock()
    reward: Any = trl_reward(scorer, [int(tokenizer.eos_token_id)])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=Dataset.from_list(_train_rows(setup.train_path)),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    result.wall_seconds = clock.train_seconds
    result.total_seconds = time.perf_counter() - started
    return result
