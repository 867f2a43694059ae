"""KitReport: what ``kit.json`` records about a built tiny-model kit.

Where it sits: written by ``pipeline.py`` at the end of a build, read back by ``build.py``
(``load_report``), the CLI's summary and tests. Pure python. Paths are stored relative to the
kit directory because the kit is built in a temp dir and renamed into place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class KitReport:
    """Provenance and quality numbers of one kit build."""

    seed: int
    key: str
    recipe_version: int
    recipe: dict[str, Any]
    versions: dict[str, str]
    threads: int
    build_seconds: float
    stage_seconds: dict[str, float]
    vocab_size: int
    target_steps: int
    eval_prompts: int
    # Exact-match accuracy of the target (as saved, bf16 weights) on held-out eval prompts.
    target_greedy_accuracy: float
    target_temp1_accuracy: float
    target_greedy_accuracy_by_length: dict[str, float]
    # Per-token argmax agreement of draft and target on the target's greedy completions.
    draft_greedy_agreement: float
    # Sign of the reward model's score vs true correctness: on held-out synthetic pairs (half
    # correct, half one-edit corruptions) and on the target's temperature-1 eval samples.
    reward_accuracy: float
    reward_accuracy_policy_samples: float
    # Accuracy of always answering the majority class on those policy samples (for reference).
    reward_policy_base_rate: float
    param_counts: dict[str, int]
    paths: dict[str, str]
    reward_input: str = "tokenizer(prompt + completion): <bos> prompt completion, no EOS"
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KitReport:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> str:
        """Short human-readable report (the CLI prints it)."""
        p = self.param_counts
        lines = [
            f"tiny-model kit {self.key} (seed {self.seed}, recipe v{self.recipe_version})",
            f"  build time      {self.build_seconds:.1f} s on {self.threads} thread(s)  "
            + ", ".join(f"{k} {v:.0f}s" for k, v in self.stage_seconds.items()),
            f"  policy          {p.get('policy', 0) / 1e6:.2f}M params, {self.target_steps} steps,"
            f" accuracy greedy {self.target_greedy_accuracy:.3f} / temp-1"
            f" {self.target_temp1_accuracy:.3f} ({self.eval_prompts} eval prompts)",
            f"  draft           {p.get('draft', 0) / 1e6:.2f}M params, greedy agreement"
            f" {self.draft_greedy_agreement:.3f}",
            f"  reward          {p.get('reward', 0) / 1e6:.2f}M params, accuracy"
            f" {self.reward_accuracy:.3f} (synthetic) / {self.reward_accuracy_policy_samples:.3f}"
            f" (policy samples; majority-class {self.reward_policy_base_rate:.3f})",
            f"  vocab size      {self.vocab_size}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
