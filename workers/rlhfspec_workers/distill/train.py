"""Distil the policy into the draft: forward KL on the response positions.

Where it sits: step 3 of ``distill``. The loss is KL(p || q), p the policy's next-token
distribution and q the draft's, averaged over response tokens: it is the divergence whose
minimum maximises speculative sampling's acceptance sum_x min(p, q) in the limit, and it
needs no samples beyond the rollouts. The teacher's logits are recomputed for every batch
(a stored [tokens, vocab] table for a 49k vocabulary would take gigabytes).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfspec_workers.distill.rollouts import DraftExample
from rlhfspec_workers.torch_models import pad_batch, response_logits


@dataclass(frozen=True)
class DistillStats:
    steps: int
    seconds: float
    tokens: int
    """Response tokens the draft trained on (repeats counted)."""
    first_loss: float
    last_loss: float


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> Any:
    """Mean over masked positions of KL(softmax(teacher) || softmax(student)).
    logits: [B, T, V]; mask: [B, T] -> scalar."""
    p_log = torch.log_softmax(teacher_logits.float(), dim=-1)
    q_log = torch.log_softmax(student_logits.float(), dim=-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(dim=-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


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
    log: Callable[[str], None] | None = None,
) -> DistillStats:
    """``steps`` AdamW steps of forward-KL distillation on random batches of ``examples``."""
    if not examples:
        raise ValueError("no rollouts to distil from")
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10))
    )
    rng = random.Random(seed)
    policy.eval()
    draft.train()
    started = time.perf_counter()
    first = last = float("nan")
    tokens = 0
    for step in range(steps):
        batch_examples = rng.sample(list(examples), min(batch_size, len(examples)))
        batch = pad_batch(
            [e.prompt_ids for e in batch_examples],
            [e.response_ids for e in batch_examples],
            pad_id,
        )
        with torch.no_grad():
            teacher = response_logits(policy, batch)
        loss = kl_loss(teacher, response_logits(draft, batch), batch.response_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        last = float(loss.detach())
        first = last if step == 0 else first
        tokens += int(batch.response_mask.sum())
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1}/{steps}: KL {last:.3f}")
    draft.eval()
    return DistillStats(steps, time.perf_counter() - started, tokens, first, last)
