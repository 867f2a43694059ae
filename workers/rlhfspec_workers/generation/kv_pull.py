"""The destination's side of KV migration: pull a handed-over sample's KV snapshot, then load it.

Where it sits: inside the generation worker's loop (``worker.GenerationWorker``), between
its sample table and the engine. A sample handed over with ``kv_snapshot_url`` waits in the
table (PULLING_KV) while its snapshot is fetched and verified on a thread
(``kv_intake.fetch``; network waits and hashing release the GIL, so the worker keeps decoding,
as vLLM's own connectors load remote KV asynchronously); once it is here the worker submits
the sample with the snapshot as the KV vLLM loads instead of re-prefilling. Every snapshot
that cannot be used (lost, refused, unreadable, not fitting this engine) means a recompute,
counted under its reason in the iteration's generation stats.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from rlhfspec_workers.faults import fault_point
from rlhfspec_workers.messages import KVSnapshot, SampleTask

from . import kv_intake
from .counters import GenerationCounters
from .kv_auth import FallbackReason, KVAuth, KVRefused
from .kv_migration import KVMigrationPort, KVState
from .sample_table import Pull, Sample, SampleTable

DeadLetter = Callable[[str, str, bytes, str], None]
"""(stream, entry id, payload, reason): ``Bus.dead_letter``."""


class KVPulls:
    def __init__(
        self,
        name: str,
        kv: KVMigrationPort | None,
        auth: KVAuth | None,
        counters: GenerationCounters,
        dead_letter: DeadLetter,
        observe_received: Callable[[int, float], None],
    ) -> None:
        self.name = name
        self.kv = kv
        self.auth = auth
        self.counters = counters
        self.dead_letter = dead_letter
        self.observe_received = observe_received
        """(snapshot bytes, seconds decoding them): the hand-over's receive rate."""
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-pull")

    def ready(self, table: SampleTable, sample: Sample) -> bool:
        """Whether ``sample`` can be submitted now; a KV-migrated one once its snapshot is
        here (the first call starts the pull: QUEUED -> PULLING_KV)."""
        url, kv = sample.task.kv_snapshot_url, self.kv
        if url is None or kv is None:
            return True
        if sample.pull is None:
            pull = self._executor.submit(_timed_pull, url, sample.sample_id, self.auth, kv)
            table.start_pull(sample.sample_id, pull)
            return False
        return sample.pull.done()

    def load(self, task: SampleTask, pull: Pull | None) -> KVState | None:
        """The migrated sample's pulled and verified KV snapshot; None (recompute, counted with
        its reason) when there is none, the source lost it or died, it fails its seal or does
        not fit this engine (``kv_intake``)."""
        url = task.kv_snapshot_url
        if url is None or pull is None:
            return None
        try:
            snapshot, pull_seconds = pull.result()
            started = time.perf_counter()
            state = KVState.from_message(snapshot)
        except (KVRefused, ValueError) as exc:
            refused = exc if isinstance(exc, KVRefused) else KVRefused("malformed", str(exc))
            if refused.reason == "malformed":  # sealed by this job yet unreadable: a bug
                self.dead_letter(url, "kv", b"", f"{task.sample_id}: {refused.detail}")
            self.fallback(task, refused.reason, refused.detail)
            return None
        except Exception as exc:  # anything else on the way (a cut connection): recompute
            self.fallback(task, "unreachable", repr(exc))
            return None
        seconds = time.perf_counter() - started
        fault_point("before_import_kv")
        self.counters.add(task.iteration, "kv_receive_seconds", seconds)
        self.counters.add(task.iteration, "kv_pull_seconds", pull_seconds)
        # The pull (and the seal check) ran beside the engine: its wall time (mostly waiting
        # for the source's server thread) delays this one sample but stalls no engine, so it
        # is not a cost the planner should weigh against a recompute's prefill, which stalls
        # every sample.
        self.observe_received(len(snapshot.data), seconds)
        return state

    def fallback(self, task: SampleTask, reason: FallbackReason, detail: str) -> None:
        print(f"[rlhfspec] {self.name}: {task.sample_id}: KV snapshot not loaded ({reason}: "
              f"{detail}); recomputing", flush=True)  # fmt: skip
        self.counters.add(task.iteration, "kv_fallbacks", 1)
        self.counters.add(task.iteration, f"kv_fallback:{reason}", 1)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _timed_pull(
    url: str, sample_id: str, auth: KVAuth | None, kv: KVMigrationPort
) -> tuple[KVSnapshot, float]:
    """On the pull thread: the snapshot, verified against this job's key and ``kv``'s cache
    layout (hashing releases the GIL: ~2.4 ms per 4 MB, beside the engine)."""
    started = time.perf_counter()
    snapshot = kv_intake.fetch(url, sample_id, auth, kv.layout, kv.block_size)
    return snapshot, time.perf_counter() - started
