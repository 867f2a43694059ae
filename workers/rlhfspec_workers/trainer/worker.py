"""The trainer worker: an iteration's Experiences in, policy weights version N out.

Where it sits: ``rlhfspec worker trainer``, the last stage of an iteration. It collects the
iteration's experiences from the ``trainer`` consumer group (deduplicated by sample id),
trains once all ``promptsPerIteration x samplesPerPrompt`` samples are in, exports the new
policy to shared storage (``weights/v<N>``), checkpoints every ``checkpointEvery`` iterations,
then publishes :class:`WeightsPublished` (the generation workers sync from it and the
coordinator starts the next iteration). Entries are acked only after the weights are
published, so a trainer killed mid-iteration re-reads them from its pending list and resumes
from its checkpoint: no iteration is repeated or skipped.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from rlhfspec_api.manifest import RLHFJob
from rlhfspec_workers.faults import fault_point
from rlhfspec_workers.hardware import available_cores
from rlhfspec_workers.messages import Experience, Keys, WeightsPublished, WorkerStatus
from rlhfspec_workers.preflight import ResolvedPaths
from rlhfspec_workers.runtime import Bus, StreamEntry

from .checkpoint import CheckpointStore
from .draft_refresh import DraftRefresher, refresh_spec
from .policy_trainer import PolicyTrainer, TrainStats
from .state_io import prune_versions
from .storage import StorageGuard
from .trained_record import record_path, write_trained_record

KEEP_WEIGHT_VERSIONS = 3
"""Exported policy versions kept on storage (a slow generation worker may still load one)."""


class TrainerWorker:
    def __init__(
        self,
        job: RLHFJob,
        bus: Bus,
        trainer: PolicyTrainer,
        store: CheckpointStore,
        drafts: DraftRefresher | None = None,
    ):
        self.spec = job.spec
        self.bus = bus
        self.keys: Keys = bus.keys
        self.trainer = trainer
        self.store = store
        self.expected = self.spec.algorithm.samples_per_iteration
        self.weights_root = bus.env.storage / "weights"
        self.buffer: dict[int, dict[str, StreamEntry[Experience]]] = {}
        self.storage = StorageGuard(bus)
        """No room for a checkpoint or an export: report StorageFull and retry, not exit."""
        self.drafts = drafts
        """The draft model kept fresh with the policy (a draft_model drafter's refresh)."""
        self.draft_seconds = 0.0
        """Time spent refreshing the draft since the last weights were published."""
        self.pending_draft: tuple[int, list[Experience]] | None = None
        """With ``overlap``: the trained iteration whose rollouts the draft is distilled on
        while the next iteration generates."""

    def run(self) -> int:
        bus, keys = self.bus, self.keys
        bus.ensure_group(keys.experience, Keys.TRAINER_GROUP)
        self.store.remove_partials()
        self._resume()
        self._take(
            bus.read_group(
                keys.experience,
                Keys.TRAINER_GROUP,
                Experience,
                count=100_000,
                block_ms=0,
                pending=True,
            )
        )
        while not bus.stop_requested():
            self._beat("ready")
            if self.pending_draft is not None:  # idle until the next batch: distil now
                self._beat("busy")
                self._refresh_draft(*self.pending_draft)
                self.pending_draft = None
            self._take(
                bus.read_group(
                    keys.experience, Keys.TRAINER_GROUP, Experience, count=1024, block_ms=500
                )
            )
            nxt = self.trainer.iteration + 1
            if len(self.buffer.get(nxt, {})) >= self.expected:
                self._beat("busy")
                self._train(nxt)
        self._beat("stopping")
        return 0

    def _resume(self) -> None:
        """Restore the last checkpoint; make the published weights agree with it."""
        remove_partial_exports(self.weights_root)
        restored = self.store.restore(self.trainer) if self.store.latest() is not None else 0
        published = self.bus.get(self.keys.weights, WeightsPublished)
        if self.drafts is not None:
            remove_partial_exports(self.drafts.root, "draft export")
            self.drafts.restore()
        if published is not None and published.iteration > restored:
            # Trained past the last checkpoint (checkpointEvery > 1) before a crash: the exported
            # weights are exact; the optimizer state is the checkpoint's (Adam moments older).
            from safetensors.torch import load_file

            state: dict[str, torch.Tensor] = {}
            for f in sorted(Path(published.path).glob("*.safetensors")):
                state.update(load_file(str(f)))
            with torch.no_grad():
                self.trainer.policy.load_state_dict(state, strict=False)
            self.trainer.iteration = published.iteration
            print(
                f"[rlhfspec] trainer: resumed policy v{published.iteration} from its exported "
                f"weights; optimizer state from checkpoint {restored}",
                flush=True,
            )
        elif restored and (published is None or published.iteration < restored):
            self._publish(restored, None)  # checkpointed, crashed before publishing
        if restored:
            print(f"[rlhfspec] trainer: resumed from checkpoint {restored}", flush=True)

    def _take(self, entries: list[StreamEntry[Experience]]) -> None:
        for entry in entries:
            entry_id, experience = entry
            iteration = experience.rollout.iteration
            bucket = self.buffer.setdefault(iteration, {})
            sample = experience.rollout.sample_id
            if iteration <= self.trainer.iteration or sample in bucket:
                self.bus.ack(self.keys.experience, Keys.TRAINER_GROUP, entry_id)  # duplicate
                continue
            bucket[sample] = entry

    def _train(self, iteration: int) -> None:
        entries = self.buffer.pop(iteration)
        experiences = [e for _, e in entries.values()]
        stats = self.trainer.train_iteration(experiences)
        self.storage.until_written(
            lambda: write_trained_record(self.bus.env.storage, iteration, experiences),
            record_path(self.bus.env.storage, iteration),
            "trained record",
        )
        started = time.perf_counter()
        if iteration % self.spec.trainer.checkpoint_every == 0 or (
            iteration == self.spec.algorithm.iterations
        ):
            self.storage.until_written(
                lambda: self.store.save(iteration, self.trainer),
                self.store.path(iteration),
                "checkpoint",
            )
        saved = time.perf_counter() - started
        overlap = self.drafts is not None and self.drafts.settings.overlap
        if not overlap:
            self._refresh_draft(iteration, experiences)
        self.storage.until_written(
            lambda: self._publish(iteration, stats),
            self.weights_root / f"v{iteration}",
            "weight export",
        )
        fault_point("after_weight_publish")
        print(
            f"[rlhfspec] trainer: iteration {iteration} trained on {stats.samples} samples "
            f"(reward {stats.reward_mean:.3f}, kl {stats.kl:.4f}, rollout/trainer log-prob "
            f"mismatch mean {stats.logprob_mismatch_mean:.2e} max {stats.logprob_mismatch_max:.2e}"
            f", {stats.seconds:.1f}s of which old log-probs {stats.old_logprob_seconds:.1f}s, "
            f"checkpoint {saved:.2f}s)",
            flush=True,
        )
        self.bus.ack(self.keys.experience, Keys.TRAINER_GROUP, *(i for i, _ in entries.values()))
        if overlap:
            self.pending_draft = (iteration, experiences)

    def _refresh_draft(self, iteration: int, experiences: list[Experience]) -> None:
        """Distil the draft on this iteration's rollouts when it is due, and write it; the
        next weights published carry it (generation loads both from the one message)."""
        drafts = self.drafts
        if drafts is None:
            return
        # Drafting starts at the iteration after the next publication: none may be left.
        first_use = iteration + (2 if drafts.settings.overlap else 1)
        if first_use > self.spec.algorithm.iterations:
            return
        reason = drafts.due(iteration, self.bus.generation_stats(iteration))
        if reason is None:
            return
        seconds = drafts.distill(self.trainer.policy, experiences, seed=iteration)
        started = time.perf_counter()
        self.storage.until_written(
            lambda: drafts.write(iteration), drafts.root / f"v{iteration}", "draft export"
        )
        took = seconds + time.perf_counter() - started
        self.draft_seconds += took
        print(
            f"[rlhfspec] trainer: draft v{iteration} distilled on {len(experiences)} rollouts "
            f"({reason}) in {took:.2f}s",
            flush=True,
        )

    def _publish(self, iteration: int, stats: TrainStats | None) -> None:
        started = time.perf_counter()
        out = self.weights_root / f"v{iteration}"
        if not out.exists():
            # fp32 on CPU: generation runs the tiny models in fp32 there (see generation.worker).
            dtype = None if torch.cuda.is_available() else torch.float32
            self.trainer.export_weights(out, dtype=dtype)
        export = time.perf_counter() - started
        message = WeightsPublished(
            policy_version=iteration,
            iteration=iteration,
            path=str(out),
            policy_loss=stats.policy_loss if stats else None,
            value_loss=stats.value_loss if stats else None,
            kl=stats.kl if stats else None,
            entropy=stats.entropy if stats else None,
            reward_mean=stats.reward_mean if stats else None,
            reward_std=stats.reward_std if stats else None,
            response_length_mean=stats.response_length_mean if stats else None,
            samples=stats.samples if stats else 0,
            train_seconds=(stats.seconds if stats else 0.0) + export,
            logprob_mismatch_mean=stats.logprob_mismatch_mean if stats else None,
            logprob_mismatch_max=stats.logprob_mismatch_max if stats else None,
            rollout_kl=stats.rollout_kl if stats else None,
            draft_version=self.drafts.current.version if self.drafts else None,
            draft_path=str(self.drafts.current.path) if self.drafts else None,
            draft_refresh_seconds=self.draft_seconds,
        )
        self.draft_seconds = 0.0
        self.bus.put(self.keys.weights, message)
        self.bus.publish(self.keys.weights_log, message)
        prune_versions(self.weights_root, KEEP_WEIGHT_VERSIONS)

    def _beat(self, state: str) -> None:
        self.bus.heartbeat(
            WorkerStatus(
                worker=self.bus.env.worker,
                role="trainer",
                state=state,  # type: ignore[arg-type]
                weight_version=self.trainer.iteration,
            )
        )


def remove_partial_exports(weights_root: Path, kind: str = "weight export") -> list[Path]:
    """Remove the hidden temp dirs a trainer killed mid-export left (``.v<N>.tmp-*``, and
    ``.v<N>.old-*`` from a replaced export); returns them. Only this trainer writes there and
    it is not exporting yet, so none is in use; generation never lists them."""
    if not weights_root.is_dir():
        return []
    partial = [p for p in weights_root.glob(".v*") if ".tmp-" in p.name or ".old-" in p.name]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
        print(f"[rlhfspec] trainer: removed the partial {kind} {path.name}", flush=True)
    return partial


def trainer_threads(cpu: str, available: int) -> int:
    """Torch threads for the trainer: the whole cores of its ``resources.cpu`` quantity (at
    least 1), at most the ``available`` cores. ``OMP_NUM_THREADS`` (1 unless set, see the
    entrypoint) would otherwise leave a pod given 8 cores computing on one. More threads than
    free cores is far worse than fewer: measured on 2 shared cores, 2 threads took 4-8x longer
    than 1 while other processes held a core."""
    try:
        cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    except ValueError:
        cores = 1.0
    return max(1, min(int(cores), available))


def run(job: RLHFJob, paths: ResolvedPaths, bus: Bus) -> int:
    spec = job.spec
    if not torch.cuda.is_available():
        torch.set_num_threads(trainer_threads(str(spec.trainer.resources.cpu), available_cores()))
    trainer = PolicyTrainer(
        spec, paths.models["spec.models.policy"], paths.models.get("spec.models.critic")
    )
    store = CheckpointStore(bus.env.storage / "checkpoints", keep=spec.trainer.keep_checkpoints)
    drafts = None
    refreshed = refresh_spec(spec)
    if refreshed is not None:
        index, settings = refreshed
        initial = paths.models[f"spec.generation.speculative.drafters[{index}].model"]
        drafts = DraftRefresher(settings, initial, bus.env.storage / "drafts", trainer.pad_id)
    return TrainerWorker(job, bus, trainer, store, drafts).run()
