"""Trainer checkpoints on shared storage: save atomically, keep the newest N, resume exactly.

Where it sits: the trainer worker calls :meth:`CheckpointStore.save` every
``trainer.checkpoint_every`` iterations (after the iteration's weights were exported) and
:meth:`CheckpointStore.restore` once at start-up, so a restarted trainer pod continues from the
last complete checkpoint as if it had never stopped. What goes into a checkpoint is the
trainer's business (:class:`Checkpointable`); this module owns naming, atomicity and retention.

Layout: ``<root>/iter-000042/`` per checkpoint (``policy/`` an fp32 HF model dir, ``critic/``,
``optimizer.pt``, ``rng.pt``, ``trainer.json``). A checkpoint is written into a hidden temp
dir and renamed into place, so a crash mid-save leaves no directory :meth:`latest` would pick.
A save the filesystem refuses for lack of room raises ``storage.StorageFullError`` (path,
bytes needed and free) with the partial temp dir removed: the previous checkpoint stays the
latest. :meth:`remove_partials` clears temp dirs a killed trainer left behind.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Protocol

from rlhfspec_workers.torch_models import atomic_directory

from .storage import is_no_room, storage_full, tree_bytes

_NAME = re.compile(r"^iter-(\d{6,})$")


class Checkpointable(Protocol):
    """What a checkpoint saves and restores (``PolicyTrainer`` implements it)."""

    def save_state(self, out_dir: Path) -> None: ...

    def load_state(self, state_dir: Path) -> int: ...


class CheckpointStore:
    """Checkpoints under ``root``; at most ``keep`` are kept (the newest)."""

    def __init__(self, root: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def path(self, iteration: int) -> Path:
        return self.root / f"iter-{iteration:06d}"

    def iterations(self) -> list[int]:
        """Iterations of complete checkpoints, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _NAME.match(entry.name)
            if match and entry.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        """The newest complete checkpoint's iteration, or None when there is none."""
        found = self.iterations()
        return found[-1] if found else None

    def save(self, iteration: int, trainer: Checkpointable) -> Path:
        """Write ``trainer``'s state as checkpoint ``iteration``, then prune old ones.

        Saving an iteration that already exists replaces it (a retried save after a crash
        between the rename and the caller's bookkeeping)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        dest = self.path(iteration)
        latest = self.latest()
        previous = self.path(latest) if latest is not None else None
        with atomic_directory(dest) as tmp:
            try:
                trainer.save_state(tmp)
            except Exception as exc:
                if not is_no_room(exc, tmp):
                    raise
                # Measured before atomic_directory removes the partial temp dir.
                raise storage_full(exc, dest, written=tree_bytes(tmp), previous=previous) from exc
        self._prune()
        return dest

    def remove_partials(self) -> list[Path]:
        """Remove the hidden temp dirs of saves that never finished (``.iter-N.tmp-*``, and
        ``.iter-N.old-*`` of a replaced one): a trainer killed mid-save leaves them, and on a
        nearly full disk they hold the room the next save needs. Call before saving starts."""
        if not self.root.is_dir():
            return []
        partial = [p for p in self.root.glob(".iter-*") if ".tmp-" in p.name or ".old-" in p.name]
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        return partial

    def restore(self, trainer: Checkpointable, iteration: int | None = None) -> int:
        """Load checkpoint ``iteration`` (default: the latest) into ``trainer``; returns the
        iteration restored. FileNotFoundError when there is none."""
        chosen = self.latest() if iteration is None else iteration
        if chosen is None:
            raise FileNotFoundError(f"no checkpoint under {self.root}")
        if not self.path(chosen).is_dir():
            raise FileNotFoundError(f"no checkpoint {self.path(chosen)}")
        return trainer.load_state(self.path(chosen))

    def _prune(self) -> None:
        for iteration in self.iterations()[: -self.keep]:
            shutil.rmtree(self.path(iteration), ignore_errors=True)
