"""Keep a draft model fresh as RL moves the policy: distil it again on each iteration's rollouts.

Where it sits: the trainer worker (``trainer.worker.TrainerWorker``) owns one
:class:`DraftRefresher` when a ``draft_model`` drafter has ``refresh``. After training
iteration N it asks :meth:`DraftRefresher.due` whether to refresh: every ``every``-th
iteration, or when the iteration's drafted tokens were accepted at a rate below
``onAcceptanceBelow`` (read from the generation counters ``drafted:draft_model`` and
``accepted:draft_model``). A refresh (:meth:`DraftRefresher.distill`) continues the forward-KL
distillation of ``distill.train`` with the policy just trained as the teacher, on the
iteration's own rollouts (prompt and response token ids, which the trainer holds anyway), and
:meth:`DraftRefresher.write` saves ``drafts/v<N>`` atomically (temp dir, fsync, rename). The
trainer publishes the draft's version and path inside ``WeightsPublished``, so generation
loads the policy and its draft together between iterations and never sees a half-written
draft: a trainer killed mid-write leaves ``drafts/v<N>`` absent and the old draft in use.

Why the just-trained policy is the teacher: it is the policy the next iteration samples from,
the one the draft must agree with. The rollouts come from the previous policy, but one RL step
moves a policy little, so they cover the contexts the next iteration will see.

A restarted trainer continues from the newest complete ``drafts/v<N>``. The distillation's
optimizer state is not kept: each refresh starts AdamW afresh with a one-step warm-up (a few
steps on fresh rollouts, where old moments would point towards the previous policy anyway).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfspec_api.generation import DrafterMethod, DraftRefreshSpec, SpeculativeMode
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.distill.rollouts import DraftExample
from rlhfspec_workers.distill.train import distill
from rlhfspec_workers.faults import fault_point
from rlhfspec_workers.messages import Experience
from rlhfspec_workers.redis_keys import GenStatsField
from rlhfspec_workers.torch_models import atomic_directory, load_causal_lm, save_model_dir

from .state_io import fsync_dir, fsync_tree, prune_versions, version_of

DRAFTER = DrafterMethod.DRAFT_MODEL.value
KEEP_DRAFT_VERSIONS = 3
"""Draft versions kept on storage (a slow generation worker may still be loading one)."""
MIN_DRAFTED_TOKENS = 32
"""Below this many drafted tokens in an iteration its acceptance is not measured; with
``onAcceptanceBelow`` such an iteration counts as low (a selector stops drafting with a draft
that went stale, so silence usually means staleness)."""


@dataclass(frozen=True)
class DraftVersion:
    version: int
    """The iteration whose rollouts this draft was last distilled on (0: as given)."""
    path: Path


def refresh_spec(spec: RLHFJobSpec) -> tuple[int, DraftRefreshSpec] | None:
    """(drafter index, its refresh settings) of the job's refreshed draft, if it has one."""
    speculative = spec.generation.speculative
    if speculative.mode is SpeculativeMode.OFF:
        return None
    for index, drafter in enumerate(speculative.drafters):
        if drafter.method is DrafterMethod.DRAFT_MODEL and drafter.refresh is not None:
            return index, drafter.refresh
    return None


def draft_acceptance(gen_stats: Mapping[str, float], drafter: str = DRAFTER) -> float | None:
    """Accepted / drafted tokens of ``drafter`` in an iteration's counters (None: too few)."""
    drafted = gen_stats.get(GenStatsField.drafted(drafter), 0.0)
    if drafted < MIN_DRAFTED_TOKENS:
        return None
    return gen_stats.get(GenStatsField.accepted(drafter), 0.0) / drafted


class DraftRefresher:
    def __init__(self, settings: DraftRefreshSpec, initial: Path, root: Path, pad_id: int) -> None:
        self.settings = settings
        self.initial = initial
        self.root = root
        """``<storage>/drafts``: ``v<N>`` directories, one per refresh."""
        self.pad_id = pad_id
        self.current = DraftVersion(0, initial)
        self.model: Any = None
        self.seconds = 0.0
        """Time the last refresh took (distillation and write)."""

    def restore(self) -> DraftVersion:
        """Continue from the newest complete ``drafts/v<N>`` (temp dirs are not ``v*``)."""
        if self.root.is_dir():
            versions = [p for p in self.root.glob("v*") if version_of(p) > 0 and p.is_dir()]
            if versions:
                newest = max(versions, key=version_of)
                self.current = DraftVersion(version_of(newest), newest)
        self.model = None  # loaded lazily from self.current.path
        return self.current

    def due(self, iteration: int, gen_stats: Mapping[str, float]) -> str | None:
        """Why the draft should be refreshed after ``iteration`` (None: it should not)."""
        every, below = self.settings.every, self.settings.on_acceptance_below
        if every is not None and iteration % every == 0:
            return f"every {every} iteration(s)"
        if below is not None:
            rate = draft_acceptance(gen_stats)
            if rate is None:
                return f"drafted fewer than {MIN_DRAFTED_TOKENS} tokens (acceptance unknown)"
            if rate < below:
                return f"acceptance {rate:.3f} < {below}"
        return None

    def distill(self, teacher: Any, experiences: Sequence[Experience], seed: int) -> float:
        """Distil the draft towards ``teacher`` on the experiences' rollouts; returns seconds."""
        started = time.perf_counter()
        device = next(teacher.parameters()).device
        if self.model is None:
            self.model = load_causal_lm(self.current.path, device, trainable=True)
            # Tied embeddings and head stay as they are: a third of a small model's weights
            # and most of its backward cost, for little acceptance (see distill.layers).
            self.model.get_input_embeddings().weight.requires_grad_(False)
            self.model.get_output_embeddings().weight.requires_grad_(False)
        examples = [
            DraftExample(list(e.rollout.prompt_token_ids), list(e.rollout.token_ids))
            for e in experiences
            if e.rollout.prompt_token_ids and e.rollout.token_ids
        ]
        was_training = teacher.training
        try:
            distill(
                teacher,
                self.model,
                examples,
                steps=self.settings.steps,
                batch_size=self.settings.batch_size,
                learning_rate=self.settings.learning_rate,
                pad_id=self.pad_id,
                seed=seed,
            )
        finally:
            teacher.train(was_training)
        return time.perf_counter() - started

    def write(self, iteration: int) -> DraftVersion:
        """Save the distilled draft as ``drafts/v<iteration>`` (atomic) and make it current."""
        out = self.root / f"v{iteration}"
        with atomic_directory(out) as tmp:
            save_model_dir(self.model, tmp, torch.float32, sidecar_from=self.initial)
            fsync_tree(tmp)
            fault_point("mid_draft_write")
        fsync_dir(self.root)
        self.current = DraftVersion(iteration, out)
        prune_versions(self.root, KEEP_DRAFT_VERSIONS)
        return self.current
