"""Every sample a generation worker holds: one object per sample, one status, one id.

Where it sits: inside the generation worker (``worker.GenerationWorker``), between the task
streams in Redis and the engine. A sample enters when its task is read from a stream (the
shared one, the worker's direct one, or reclaimed from a dead worker) and leaves finished
(published here, or found already published elsewhere) or preempted (handed to another
worker by a migration order). In between it is queued, pulling its KV snapshot (a
KV-migrated sample, before it can run) or running in the engine. The worker loop, the
hand-over (migration, reclaim, lease renewal, load reports) and the KV pulls move samples
only through the transitions here; an illegal one raises :class:`IllegalTransition`, since it
means two parts of the worker disagree about a sample.

One id throughout: the task's ``sample_id``. The engine request of a running sample carries
the same id, and a KV pull in flight is kept on its sample.

Life of a sample (FINISHED and PREEMPTED leave the table)::

    QUEUED -> PULLING_KV -> RUNNING -> FINISHED
    QUEUED -> RUNNING                          (nothing to pull)
    QUEUED | PULLING_KV -> FINISHED            (already published elsewhere)
    QUEUED | PULLING_KV | RUNNING -> PREEMPTED (a migration order)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

from rlhfspec_workers.messages import KVSnapshot, SampleTask

Entry = tuple[str, str]
"""(stream, entry id): where a task was read from, unacked until its sample leaves."""

Pull = Future[tuple[KVSnapshot, float]]
"""A KV snapshot's pull on the pull thread: the verified snapshot and the seconds it took."""


class SampleStatus(enum.Enum):
    QUEUED = "queued"
    """Read from a stream; waits for an engine slot (or for the policy version it needs)."""
    PULLING_KV = "pulling_kv"
    """Queued, and its KV snapshot is being pulled from the worker that handed it over."""
    RUNNING = "running"
    """In the engine, under a request named by the sample id."""
    PREEMPTED = "preempted"
    """Taken off this worker by a migration order (aborted in the engine if it ran) and
    handed to another: final here."""
    FINISHED = "finished"
    """Published (here, or by another worker before this one started it): final."""


WAITING = frozenset({SampleStatus.QUEUED, SampleStatus.PULLING_KV})
LIVE = WAITING | {SampleStatus.RUNNING}


class IllegalTransition(RuntimeError):
    """A sample asked to move where its status does not lead (or one this table lacks)."""


@dataclass(eq=False)
class Sample:
    task: SampleTask
    entries: list[Entry]
    """The stream entries this sample's task was read as, acked together when it leaves.
    Usually one; a copy of a sample already held (the same sample both handed over and
    reclaimed after a worker died) adds its entry here instead of running twice."""
    status: SampleStatus = SampleStatus.QUEUED
    pull: Pull | None = field(default=None, repr=False)
    """Its KV snapshot's pull while PULLING_KV; taken by :meth:`SampleTable.start`."""

    @property
    def sample_id(self) -> str:
        return self.task.sample_id

    def entries_by_stream(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for stream, entry_id in self.entries:
            out.setdefault(stream, []).append(entry_id)
        return out


class SampleTable:
    """The live samples of one worker, in the order their tasks arrived."""

    def __init__(self) -> None:
        # Insertion-ordered: waiting samples are served first come, first served.
        self._samples: dict[str, Sample] = {}

    # -- lookups ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._samples)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._samples

    def get(self, sample_id: str) -> Sample | None:
        return self._samples.get(sample_id)

    def waiting(self) -> list[Sample]:
        """Queued samples (pulling or not), in arrival order."""
        return [s for s in self._samples.values() if s.status in WAITING]

    def running(self) -> list[Sample]:
        return [s for s in self._samples.values() if s.status is SampleStatus.RUNNING]

    def ready(self, weight_version: int) -> list[Sample]:
        """The waiting samples that may start with policy ``weight_version`` loaded: the
        longest run of them, in arrival order, that needs no newer one. A sample that needs
        the next policy stays first in line (the worker drains what runs, then syncs)."""
        out: list[Sample] = []
        for sample in self.waiting():
            if sample.task.weight_version > weight_version:
                break
            out.append(sample)
        return out

    def next_weight_version(self) -> int | None:
        """The policy version the first waiting sample needs (None: nothing waits)."""
        first = next(iter(self.waiting()), None)
        return first.task.weight_version if first is not None else None

    def entries_by_stream(self) -> dict[str, list[str]]:
        """Every stream entry held, by stream (lease renewal)."""
        out: dict[str, list[str]] = {}
        for sample in self._samples.values():
            for stream, ids in sample.entries_by_stream().items():
                out.setdefault(stream, []).extend(ids)
        return out

    # -- transitions --------------------------------------------------------------------------

    def add(self, stream: str, entry_id: str, task: SampleTask) -> Sample | None:
        """A task read from ``stream``: its sample is QUEUED. None when the sample is held
        already: the entry joins it (acked when it leaves), the copy does not run twice."""
        held = self._samples.get(task.sample_id)
        if held is not None:
            if (stream, entry_id) not in held.entries:
                held.entries.append((stream, entry_id))
            return None
        sample = Sample(task, [(stream, entry_id)])
        self._samples[task.sample_id] = sample
        return sample

    def start_pull(self, sample_id: str, pull: Pull) -> Sample:
        """QUEUED -> PULLING_KV: its KV snapshot is on the way."""
        sample = self._move(sample_id, {SampleStatus.QUEUED}, SampleStatus.PULLING_KV)
        sample.pull = pull
        return sample

    def start(self, sample_id: str) -> Sample:
        """QUEUED or PULLING_KV -> RUNNING: submitted to the engine (its pull, if any, was
        consumed to load the KV)."""
        sample = self._move(sample_id, WAITING, SampleStatus.RUNNING)
        sample.pull = None
        return sample

    def finish(self, sample_id: str) -> Sample:
        """RUNNING -> FINISHED: the engine returned it; it leaves the table."""
        return self._move(sample_id, {SampleStatus.RUNNING}, SampleStatus.FINISHED)

    def finish_elsewhere(self, sample_id: str) -> Sample:
        """QUEUED or PULLING_KV -> FINISHED: already published (a redelivered or reclaimed
        task whose first run completed); it leaves the table without running."""
        return self._move(sample_id, WAITING, SampleStatus.FINISHED)

    def preempt(self, sample_id: str) -> Sample:
        """Any live status -> PREEMPTED: handed to another worker; it leaves the table. A
        pull in flight is dropped; a RUNNING sample's engine request is the caller's to
        abort (read the status before preempting)."""
        return self._move(sample_id, LIVE, SampleStatus.PREEMPTED)

    def _move(self, sample_id: str, allowed: Iterable[SampleStatus], to: SampleStatus) -> Sample:
        sample = self._samples.get(sample_id)
        if sample is None:
            raise IllegalTransition(f"{sample_id}: not held here, cannot become {to.value}")
        if sample.status not in allowed:
            raise IllegalTransition(f"{sample_id}: {sample.status.value} -> {to.value}")
        sample.status = to
        if to not in LIVE:
            del self._samples[sample_id]
            if sample.pull is not None:
                # It moves on before it ran here: a snapshot on the way is dropped (the next
                # destination recomputes).
                sample.pull.cancel()
                sample.pull = None
        return sample
