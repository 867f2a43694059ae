"""How much of a draft's proposal speculative sampling would accept, per draft position.

Where it sits: step 4 of ``distill``, and anything that wants to compare drafts offline.
Speculative sampling accepts a drafted token with probability min(1, p/q), so at one
position the accepted mass is alpha = sum_x min(p(x), q(x)) (p the policy, q the draft,
both at temperature 1). A k-token draft starting at step t keeps its i-th token only if all
before it were kept: P(position i accepted | t) = prod_{j<=i} alpha_{t+j}, evaluated along
the policy's own held-out trajectories and averaged over every start t. This is what the
engine's accepted-per-position counters estimate, without an engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfspec_workers.distill.rollouts import DraftExample
from rlhfspec_workers.torch_models import pad_batch, response_logits


@dataclass(frozen=True)
class AcceptanceReport:
    mean_alpha: float
    """Mean per-token accepted mass over held-out response tokens."""
    per_position: tuple[float, ...]
    """P(draft position i accepted), i = 0..k-1."""
    expected_accepted: float
    """Expected accepted tokens of a k-token draft (sum of ``per_position``)."""
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_alpha": round(self.mean_alpha, 4),
            "per_position": [round(a, 4) for a in self.per_position],
            "expected_accepted": round(self.expected_accepted, 4),
            "tokens": self.tokens,
        }


def token_alphas(
    policy: Any, draft: Any, batch_examples: Sequence[DraftExample], pad_id: int
) -> list[list[float]]:
    """alpha_t for every response token of each example. -> one list per example."""
    batch = pad_batch(
        [e.prompt_ids for e in batch_examples], [e.response_ids for e in batch_examples], pad_id
    )
    with torch.no_grad():
        p = torch.softmax(response_logits(policy, batch), dim=-1)
        q = torch.softmax(response_logits(draft, batch), dim=-1)
        alpha = torch.minimum(p, q).sum(dim=-1)
    return [alpha[i, : len(e.response_ids)].tolist() for i, e in enumerate(batch_examples)]


def acceptance_report(
    policy: Any,
    draft: Any,
    examples: Sequence[DraftExample],
    *,
    k: int = 4,
    pad_id: int = 0,
    batch_size: int = 8,
) -> AcceptanceReport:
    """Per-position acceptance of ``draft`` against ``policy`` on ``examples``."""
    sums = [0.0] * k
    starts = 0
    alpha_sum, alpha_count = 0.0, 0
    for index in range(0, len(examples), batch_size):
        for alphas in token_alphas(policy, draft, examples[index : index + batch_size], pad_id):
            alpha_sum += sum(alphas)
            alpha_count += len(alphas)
            for t in range(len(alphas)):
                kept = 1.0
                for i in range(k):
                    # Past the response's end the draft has nothing left to propose.
                    kept *= alphas[t + i] if t + i < len(alphas) else 0.0
                    sums[i] += kept
                starts += 1
    per_position = tuple(s / max(starts, 1) for s in sums)
    return AcceptanceReport(
        alpha_sum / max(alpha_count, 1), per_position, sum(per_position), alpha_count
    )
