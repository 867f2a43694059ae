"""Disk full is a condition, not a crash loop: the trainer's writes to the job's storage.

Where it sits: ``trainer.checkpoint.CheckpointStore.save`` turns a write the filesystem refused
for lack of room (ENOSPC, EDQUOT, EFBIG) into :class:`StorageFullError` naming the path, the
bytes needed and the bytes free; the trainer worker runs each checkpoint and weight export
through :meth:`StorageGuard.until_written`. A refused write leaves nothing half-written (both
write into a hidden temp dir that is removed), so the previous checkpoint stays the latest.
The guard then reports a :class:`~rlhfspec_workers.messages.StorageFull` at
``Keys.storage_full`` (the operator sets the job's ``StorageFull`` condition from it, local
mode prints it), marks the trainer ``degraded`` in its heartbeat, and retries with backoff
instead of exiting: exiting would only restart the pod into the same full disk. The report is
cleared once a write succeeds. A trainer restarted while the disk is full trains the iteration
again from its checkpoint, meets the same refusal and reports it again: the condition stays.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rlhfspec_workers.messages import StorageFull, WorkerStatus
from rlhfspec_workers.runtime import Bus

NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
"""errnos meaning "no room for this write": the disk, a quota, a file size limit."""
NO_ROOM_TEXT = tuple(os.strerror(code) for code in sorted(NO_ROOM)) + tuple(
    f"os error {code}" for code in sorted(NO_ROOM)
)
"""How writers that do not raise OSError say it (safetensors: "... (os error 28)")."""
LOW_WATER_BYTES = 1 << 20
"""Less free than this where a write just failed: the disk filled up under it. torch.save
reports a full disk only as an opaque RuntimeError; its partial file has taken the rest."""
FIRST_RETRY_SECONDS = 2.0
MAX_RETRY_SECONDS = 60.0

_T = TypeVar("_T")


class StorageFullError(OSError):
    """A write to the job's storage was refused for lack of room."""

    def __init__(self, path: Path, needed_bytes: int, free_bytes: int, cause: str) -> None:
        self.path = Path(path)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        self.cause = cause
        super().__init__(errno.ENOSPC, self.describe())

    def describe(self) -> str:
        return (
            f"storage full writing {self.path}: needs about {self.needed_bytes:,} bytes, "
            f"{self.free_bytes:,} free ({self.cause}); free space on the job's storage or "
            "give it a larger volume"
        )

    def __str__(self) -> str:
        return self.describe()


def is_no_room(exc: BaseException, path: Path | None = None) -> bool:
    """Whether ``exc`` (or an exception it chains) means no room for a write: by errno, by
    the text native writers use, or (given ``path``, before the partial write is removed)
    by the filesystem under ``path`` being left nearly empty of free space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_ROOM:
            return True
        if any(text in str(current) for text in NO_ROOM_TEXT):
            return True
        current = current.__cause__ or current.__context__
    if path is None:
        return False
    try:
        return free_bytes(path) < LOW_WATER_BYTES
    except OSError:
        return False


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it is gone)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for current, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(current) / name).stat().st_size
            except OSError:
                continue  # removed while we looked
    return total


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def storage_full(
    exc: BaseException, path: Path, *, written: int = 0, previous: Path | None = None
) -> StorageFullError:
    """The StorageFullError for ``exc`` writing ``path``. What it needs is estimated from the
    previous complete write of the same kind (``previous``), else from what was written
    before the refusal (then a lower bound). ``written`` bytes of a partial write about to be
    removed count as free: that is the room the user has once it is gone."""
    needed = max(written, tree_bytes(previous) if previous is not None else 0)
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.ENOSPC
    return StorageFullError(path, needed, free_bytes(path) + written, os.strerror(code))


def newest_sibling(path: Path, prefix: str) -> Path | None:
    """The newest complete ``<prefix>N`` directory next to ``path`` (not ``path`` itself)."""
    parent = Path(path).parent
    if not parent.is_dir():
        return None
    found = [p for p in parent.glob(f"{prefix}*") if p.is_dir() and p != path]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


class StorageGuard:
    """Runs the trainer's storage writes; on no room, reports and retries (see module doc)."""

    def __init__(
        self,
        bus: Bus,
        role: str = "trainer",
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bus = bus
        self.role = role
        self.sleep = sleep
        self.reported: StorageFullError | None = None
        self._clear_on_success = True
        """A report from before a restart may still stand: the first success clears it."""

    def until_written(self, write: Callable[[], _T], path: Path, kind: str) -> _T:
        """Run ``write`` (which writes ``path``) until it succeeds or the job is stopping;
        other errors propagate. ``kind`` names the write in reports ("checkpoint")."""
        delay = FIRST_RETRY_SECONDS
        while True:
            try:
                result = write()
            except Exception as exc:
                if not is_no_room(exc):
                    raise
                error = exc if isinstance(exc, StorageFullError) else storage_full(
                    exc, path, previous=newest_sibling(path, path.name.rstrip("0123456789"))
                )  # fmt: skip
                self._report(error, kind)
                if self.bus.stop_requested():
                    raise
                self.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_SECONDS)
                continue
            if self.reported is not None or self._clear_on_success:
                self._clear()
            return result

    def _report(self, error: StorageFullError, kind: str) -> None:
        message = f"{kind}: {error.describe()}"
        if self.reported is None or str(self.reported) != str(error):
            print(f"[rlhfspec] {self.bus.env.worker}: {message}; retrying", flush=True)
        self.reported = error
        report = StorageFull(
            worker=self.bus.env.worker,
            path=str(error.path),
            needed_bytes=error.needed_bytes,
            free_bytes=error.free_bytes,
            message=message,
            reported_at=time.time(),
        )
        self.bus.put(self.bus.keys.storage_full, report)
        self.bus.heartbeat(
            WorkerStatus(
                worker=self.bus.env.worker,
                role=self.role,  # type: ignore[arg-type]
                state="degraded",
                message=message,
            )
        )

    def _clear(self) -> None:
        if self.bus.remove(self.bus.keys.storage_full):
            print(f"[rlhfspec] {self.bus.env.worker}: storage has room again", flush=True)
        self.reported = None
        self._clear_on_success = False
