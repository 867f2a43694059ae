"""Distil the policy into the draft: forward KL on the response positions.

Where it sits: step 3 of ``distill`` (and of the trainer's draft refresh). The loss is
KL(p || q), p the policy's next-token distribution and q the draft's, averaged over response
tokens: it is the divergence whose minimum maximises speculative sampling's acceptance
sum_x min(p, q) in the limit, and it needs no samples beyond the rollouts.

The teacher is frozen, so for a Llama-layout policy (logits = ``lm_head(model(ids))``) its
final hidden states at the response positions are computed once (:class:`Teacher`, [tokens,
hidden]: megabytes) and each step only re-applies its head; a stored [tokens, vocab] table
would take gigabytes for a 49k vocabulary. Other layouts recompute the teacher per batch.
Logits are only formed at real response positions (no prompt, no padding rows), and on a CPU
with native bf16 the frozen trunk and the draft's forward run under bf16 autocast; the
teacher's head, the log-softmaxes, the KL and the draft's master weights stay fp32.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfspec_workers import hardware
from rlhfspec_workers.distill.rollouts import DraftExample
from rlhfspec_workers.drafters.llama_forward import SUPPORTED_ARCHITECTURES
from rlhfspec_workers.torch_models import PaddedBatch, pad_batch, response_logits


@dataclass(frozen=True)
class DistillStats:
    steps: int
    seconds: float
    tokens: int
    """Response tokens the draft trained on (repeats counted)."""
    first_loss: float
    last_loss: float
    teacher_seconds: float = 0.0
    """Of ``seconds``: the teacher's one pass over the examples (0 when recomputed per step)."""


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> Any:
    """Mean over masked positions of KL(softmax(teacher) || softmax(student)).
    logits: [B, T, V] (or [N, V]); mask: [B, T] (or [N]) -> scalar."""
    p_log = torch.log_softmax(teacher_logits.float(), dim=-1)
    q_log = torch.log_softmax(student_logits.float(), dim=-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(dim=-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


def native_bf16(device: torch.device) -> bool:
    """True on a CPU that computes bf16 natively (``hardware.native_bf16``: AVX512-BF16 or
    AMX): there bf16 autocast is faster than fp32; on AVX2-only CPUs it is emulated and
    slower, so fp32 stays. Autocast here is CPU-only, so any other device is False."""
    return device.type == "cpu" and hardware.native_bf16("cpu")


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if not enabled or device.type != "cpu":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _device(model: Any) -> torch.device:
    device: torch.device = next(model.parameters()).device
    return device


def split_layout(model: Any) -> tuple[Any, Any] | None:
    """(trunk, head) of a model whose logits are exactly ``head(trunk(ids).last_hidden_state)``
    (the Llama family: no logit scaling or soft-capping), or None."""
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        return None
    return model.model, model.lm_head


def response_hidden(trunk: Any, batch: PaddedBatch) -> torch.Tensor:
    """[N, H] final hidden states predicting the N real response tokens, row by row."""
    hidden = trunk(input_ids=batch.input_ids).last_hidden_state
    index = batch.predict_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    picked: torch.Tensor = hidden.gather(1, index)
    return picked[batch.response_mask > 0]


def _batch(examples: Sequence[DraftExample], pad_id: int, device: torch.device) -> PaddedBatch:
    prompts = [e.prompt_ids for e in examples]
    return pad_batch(prompts, [e.response_ids for e in examples], pad_id, device=device)


class Teacher:
    """The frozen policy's next-token logits on ``examples``' responses.

    For a Llama layout the final hidden states are computed once, in batches of
    ``batch_size`` (bf16 autocast where native), and :meth:`logits` applies the fp32 head;
    otherwise each call runs the policy on the batch."""

    def __init__(
        self,
        policy: Any,
        examples: Sequence[DraftExample],
        *,
        pad_id: int = 0,
        batch_size: int = 8,
        bf16: bool = False,
    ) -> None:
        self.policy = policy
        self.examples = list(examples)
        self.pad_id = pad_id
        self.device = _device(policy)
        layout = split_layout(policy)
        self.head = layout[1] if layout is not None else None
        self.hidden: list[torch.Tensor] = []
        if layout is None:
            return
        with torch.no_grad(), autocast(self.device, bf16):
            for start in range(0, len(self.examples), batch_size):
                chunk = self.examples[start : start + batch_size]
                flat = response_hidden(layout[0], _batch(chunk, pad_id, self.device)).float()
                lengths = [len(e.response_ids) for e in chunk]
                self.hidden.extend(torch.split(flat, lengths))

    def logits(self, indices: Sequence[int]) -> torch.Tensor:
        """[N, V] fp32 logits at the response tokens of ``examples[i]`` for i in ``indices``."""
        with torch.no_grad():
            if self.head is not None:
                logits: torch.Tensor = self.head(torch.cat([self.hidden[i] for i in indices]))
                return logits.float()
            batch = _batch([self.examples[i] for i in indices], self.pad_id, self.device)
            return response_logits(self.policy, batch)[batch.response_mask > 0]


def student_logits(draft: Any, batch: PaddedBatch) -> torch.Tensor:
    """[N, V] logits of ``draft`` at the batch's real response tokens (with gradients)."""
    layout = split_layout(draft)
    if layout is None:
        return response_logits(draft, batch)[batch.response_mask > 0]
    return layout[1](response_hidden(layout[0], batch))  # type: ignore[no-any-return]


def distill(
    policy: Any,
    draft: Any,
    examples: Sequence[DraftExample],
    *,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 3e-4,
    pad_id: int = 0,
    seed: int = 0,
    bf16: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> DistillStats:
    """``steps`` AdamW steps of forward-KL distillation on random batches of ``examples``.

    ``bf16`` None: autocast where the CPU has native bf16 (:func:`native_bf16`)."""
    if not examples:
        raise ValueError("no rollouts to distil from")
    device = _device(draft)
    use_bf16 = native_bf16(device) if bf16 is None else bf16
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10))
    )
    rng = random.Random(seed)
    policy.eval()
    started = time.perf_counter()
    teacher = Teacher(policy, examples, pad_id=pad_id, batch_size=batch_size, bf16=use_bf16)
    teacher_seconds = time.perf_counter() - started if teacher.head is not None else 0.0
    draft.train()
    first = last = float("nan")
    tokens = 0
    for step in range(steps):
        # Indices, not examples: the same draws as sampling the examples themselves.
        indices = rng.sample(range(len(examples)), min(batch_size, len(examples)))
        batch = _batch([examples[i] for i in indices], pad_id, device)
        target = teacher.logits(indices)
        with autocast(device, use_bf16):
            predicted = student_logits(draft, batch)
        loss = kl_loss(target, predicted, torch.ones(target.shape[0], device=device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        last = float(loss.detach())
        first = last if step == 0 else first
        tokens += target.shape[0]
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1}/{steps}: KL {last:.3f}")
    draft.eval()
    elapsed = time.perf_counter() - started
    return DistillStats(steps, elapsed, tokens, first, last, teacher_seconds)
