"""What every worker process shares: Redis with retries, streams, flags, heartbeats.

Where it sits: ``rlhfspec worker ROLE`` (``entrypoint``) builds a :class:`WorkerEnv` from the
pod's environment (``worker_env``, re-exported here), loads the job once, and hands a
:class:`Bus` to the role's loop (coordinator, generation, inference, trainer); local mode's
watcher (``local.run``) opens one too. The bus is the only code that talks to a job's Redis:
no other module touches its client (a test walks the sources). It holds consumer groups on
streams and readers with a :class:`StreamCursor` (every payload a ``messages`` model under
the field :data:`FIELD`; one that does not parse is dead-lettered), the whole history of a
record stream, keys holding the latest message, counters, the sets of finished samples, the
coordinator's state hash, the stop flag and the heartbeat hash. A read returns
:class:`StreamEntry` pairs. Every call goes through ``redis_retry.retrying``: an outage is
retried with backoff, refused credentials raise :class:`RedisCredentialsError` at once.
Worker names (consumer names, heartbeat fields, key suffixes) are :func:`worker_name`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import redis

from rlhfspec_workers.dead_letters import dead_letter_of
from rlhfspec_workers.messages import FIELD as FIELD
from rlhfspec_workers.messages import (
    EvalScore,
    Keys,
    LoadReport,
    Message,
    MessageError,
    WorkerStatus,
    decode,
)
from rlhfspec_workers.observability.metrics import WorkerMetrics
from rlhfspec_workers.redis_retry import RETRY_SECONDS, report_stderr, retrying
from rlhfspec_workers.redis_retry import RedisCredentialsError as RedisCredentialsError
from rlhfspec_workers.worker_env import MIN_KV_SECRET_CHARS as MIN_KV_SECRET_CHARS
from rlhfspec_workers.worker_env import WorkerEnv as WorkerEnv
from rlhfspec_workers.worker_env import WorkerEnvError as WorkerEnvError
from rlhfspec_workers.worker_names import ROLES as ROLES
from rlhfspec_workers.worker_names import WorkerName as WorkerName
from rlhfspec_workers.worker_names import parse_worker_name as parse_worker_name
from rlhfspec_workers.worker_names import worker_name as worker_name

log = logging.getLogger("rlhfspec.worker")

RECLAIM_SCAN_CALLS = 8
"""XAUTOCLAIM calls per reclaim: enough to walk every live worker's pending entries."""
_T = TypeVar("_T")
_M = TypeVar("_M", bound=Message)
_MARK_DONE_AND_ADD = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""
"""Mark a sample done; add its figures to a hash only when it was not done already."""


class StreamEntry(NamedTuple, Generic[_M]):
    """One entry read from a stream: its id (what acks, lease renewals and cursors name) and
    its payload decoded as the stream's message."""

    entry_id: str
    message: _M


@dataclass
class StreamCursor(Generic[_M]):
    """A reader of one stream outside any consumer group (each such reader sees every entry):
    the stream, what its entries decode to, and the last entry read (:meth:`Bus.read_new`
    moves it). Start at "0-0" to read the whole stream, at :meth:`Bus.last_entry_id` to read
    only what is added later."""

    stream: str
    expected: type[_M]
    last_id: str = "0-0"


class Bus:
    """One worker's view of the job's Redis: streams, groups, flags and heartbeats. Its
    methods say what a call means to the job; they are the only callers of :attr:`redis`."""

    def __init__(
        self,
        env: WorkerEnv,
        *,
        client: redis.Redis | None = None,
        metrics: WorkerMetrics | None = None,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        """``retry_seconds``: how long a call rides out an outage (0: it raises one of
        ``redis_retry.OUTAGE_ERRORS`` at once, for a caller that has better to do meanwhile)."""
        self.env = env
        self.metrics = metrics or WorkerMetrics(env.job, env.role, env.worker)
        """This process's Prometheus metrics (served by the entrypoint)."""
        self.keys = Keys(env.namespace, env.job)
        tls: dict[str, Any] = {}
        if env.redis_ca_file is not None and env.redis_url.startswith("rediss://"):
            tls["ssl_ca_certs"] = str(env.redis_ca_file)
        self.redis = client or redis.Redis.from_url(
            env.redis_url,
            password=env.redis_password,
            socket_timeout=30,
            socket_connect_timeout=5,
            health_check_interval=10,
            **tls,
        )
        """The client: called by this class only (tests may look past it)."""
        self.outages = 0
        self.retry_seconds = retry_seconds

    def call(self, what: str, fn: Callable[[], _T]) -> _T:
        def report(message: str) -> None:
            self.outages += 1
            report_stderr(f"{self.env.worker}: {message}")

        return retrying(
            fn,
            what=what,
            deadline_seconds=self.retry_seconds,
            on_retry=report,
            credentials=self.env.redis_password_source,
        )

    def wait_ready(self) -> None:
        self.call("connect", self.redis.ping)

    # -- streams ----------------------------------------------------------------------------

    def ensure_group(self, stream: str, group: str) -> None:
        def create() -> None:
            try:
                self.redis.xgroup_create(stream, group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        self.call(f"create group {group}", create)

    def publish(self, stream: str, message: Message) -> str:
        entry = self.call(
            f"publish to {stream}", lambda: self.redis.xadd(stream, {FIELD: message.to_bytes()})
        )
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def pipelined(self, what: str, build: Callable[[Any], None]) -> list[Any]:
        """Queue commands with ``build(pipe)`` and send them in one round trip, as one
        MULTI/EXEC transaction (all or none applied; a retry after a lost reply may re-apply
        them, which every consumer already tolerates: rollouts and experiences are deduplicated
        by sample id). Per-sample calls cost a round trip each (~1-2 ms on a loaded host);
        a worker finishing hundreds of samples per iteration batches them here."""

        def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=True)
            build(pipe)
            return list(pipe.execute())

        return self.call(what, run)

    @staticmethod
    def queue_publish(pipe: Any, stream: str, message: Message) -> None:
        """``publish`` inside a :meth:`pipelined` build."""
        pipe.xadd(stream, {FIELD: message.to_bytes()})

    @staticmethod
    def queue_mark_done(
        pipe: Any, done_key: str, sample_id: str, stats_key: str, amounts: Mapping[str, float]
    ) -> None:
        """Inside a :meth:`pipelined` build: add ``sample_id`` to the done set at ``done_key``
        and, only if it was not there yet, each amount to its field of the hash at
        ``stats_key``. One script, so a sample's figures are added exactly once however often
        it is published (a copy finished by two workers, a transaction re-sent after a lost
        reply)."""
        flat = [str(x) for pair in amounts.items() for x in pair]
        pipe.eval(_MARK_DONE_AND_ADD, 2, done_key, stats_key, sample_id, *flat)

    def read_group(
        self,
        stream: str,
        group: str,
        expected: type[_M],
        *,
        count: int,
        block_ms: int | None,
        pending: bool = False,
    ) -> list[StreamEntry[_M]]:
        """Entries for this consumer; ``pending=True`` re-reads what it was given and did not
        ack (after a restart). ``block_ms=None`` returns at once (Redis reads 0 as "forever").
        Undecodable entries are dead-lettered and acked here."""
        start = "0" if pending else ">"
        reply: Any = self.call(
            f"read {stream}",
            lambda: self.redis.xreadgroup(
                group, self.env.worker, {stream: start}, count=count, block=block_ms
            ),
        )
        return self._decode_entries(stream, group, expected, reply)

    def reclaim(
        self, stream: str, group: str, expected: type[_M], *, min_idle_ms: int, count: int
    ) -> list[StreamEntry[_M]]:
        """Take over entries another consumer was given and did not ack within the lease (the
        consumer died). XAUTOCLAIM transfers ownership, so each entry has one owner."""
        entries: list[Any] = []
        cursor: Any = "0-0"
        # XAUTOCLAIM examines at most 10*count pending entries per call: follow its cursor
        # past live consumers' entries (bounded) so a dead one's are found behind them.
        for _ in range(RECLAIM_SCAN_CALLS):

            def claim(start: Any = cursor, wanted: int = count - len(entries)) -> Any:
                return self.redis.xautoclaim(
                    stream, group, self.env.worker, min_idle_time=min_idle_ms,
                    start_id=start, count=wanted,
                )  # fmt: skip

            reply: Any = self.call(f"reclaim {stream}", claim)
            if not reply:
                break
            cursor, claimed = reply[0], reply[1]
            entries += claimed
            if len(entries) >= count or cursor in (b"0-0", "0-0"):
                break
        return self._decode_entries(stream, group, expected, [[stream, entries]])

    def read_new(
        self, cursor: StreamCursor[_M], *, count: int | None = None, block_ms: int | None = None
    ) -> list[StreamEntry[_M]]:
        """Entries after ``cursor`` (oldest first, at most ``count``), decoded; the cursor moves
        past all of them, the dead-lettered ones included. Returns at once, or with
        ``block_ms`` waits up to that long for a first entry."""
        stream = cursor.stream
        reply: Any = self.call(
            f"read {stream}",
            lambda: self.redis.xread({stream: cursor.last_id}, count=count, block=block_ms),
        )
        for _, entries in reply or []:
            if entries:
                cursor.last_id = _text(entries[-1][0])
        return self._decode_entries(stream, None, cursor.expected, reply)

    def last_entry_id(self, stream: str) -> str:
        """The newest entry's id ("0-0" while the stream is empty or absent)."""
        last: Any = self.call(f"read {stream}", lambda: self.redis.xrevrange(stream, count=1))
        return _text(last[0][0]) if last else "0-0"

    def history(self, stream: str, expected: type[_M]) -> list[StreamEntry[_M]]:
        """Every entry of a record stream (metrics rows, the weights log), oldest first. One
        that does not decode is skipped, not dead-lettered: a writer of another version keeps
        its own records, and a history is read again at every start."""
        entries: Any = self.call(f"read {stream}", lambda: self.redis.xrange(stream))
        out: list[StreamEntry[_M]] = []
        for raw_id, fields in entries or []:
            try:
                out.append(StreamEntry(_text(raw_id), decode(fields[FIELD], expected)))
            except (KeyError, MessageError):
                continue
        return out

    def stream_length(self, stream: str) -> int:
        """Entries ``stream`` holds (0 when absent)."""
        return int(self.call(f"read {stream}", lambda: self.redis.xlen(stream)))

    def _decode_entries(
        self, stream: str, group: str | None, expected: type[_M], reply: Any
    ) -> list[StreamEntry[_M]]:
        """The one read loop: each entry of an XREAD/XREADGROUP-shaped ``reply`` decoded as
        ``expected``; one that does not decode is dead-lettered and, read through ``group``,
        acked (the dead-letter stream keeps it, so it never stays pending)."""
        out: list[StreamEntry[_M]] = []
        for _, entries in reply or []:
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                if fields is None:  # trimmed while pending (only group reads see these)
                    if group is not None:
                        self.ack(stream, group, entry_id)
                    continue
                raw = fields.get(FIELD, b"")
                try:
                    out.append(StreamEntry(entry_id, decode(raw, expected)))
                except MessageError as exc:
                    self.dead_letter(stream, entry_id, raw, str(exc))
                    if group is not None:
                        self.ack(stream, group, entry_id)
        return out

    def ack(self, stream: str, group: str, *entry_ids: str) -> None:
        if entry_ids:
            self.call(f"ack {stream}", lambda: self.redis.xack(stream, group, *entry_ids))

    def renew_leases(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries this consumer holds (XCLAIM to itself), so that
        :meth:`reclaim` elsewhere leaves a live worker's long samples alone."""
        ids: list[Any] = list(entry_ids)
        if ids:
            self.call(
                "renew lease",
                lambda: self.redis.xclaim(stream, group, self.env.worker, 0, ids, justid=True),
            )

    def dead_letter(self, stream: str, entry_id: str, raw: bytes | str, reason: str) -> None:
        """Keep a payload nobody can use, with the reason; log it with the sample id."""
        letter = dead_letter_of(stream, entry_id, raw, reason)
        self.publish(self.keys.dead_letters, letter)
        where = f"{stream} {entry_id} (sample {letter.sample_id})"
        report_stderr(f"{self.env.worker}: dead-lettered {where}: {reason}")

    # -- flags and heartbeats ---------------------------------------------------------------

    def stop_requested(self) -> bool:
        return bool(self.call("read stop flag", lambda: self.redis.exists(self.keys.stop)))

    def request_stop(self) -> None:
        """Tell every worker of the job to stop (they poll :meth:`stop_requested`)."""
        self.call("set stop", lambda: self.redis.set(self.keys.stop, b"1"))

    def clear_stop_and_failure(self) -> None:
        """A run (re)starts: the stop flag and a failure reported before it are the old run's."""
        self.call("clear stop", lambda: self.redis.delete(self.keys.stop, self.keys.failure))

    def heartbeat(self, status: WorkerStatus) -> None:
        self.metrics.observe_status(status)
        payload = status.model_copy(update={"updated_at": time.time()}).to_bytes()
        self.call("heartbeat", lambda: self.redis.hset(self.keys.workers, status.worker, payload))

    def workers(self) -> dict[str, WorkerStatus]:
        raw: dict[Any, Any] = self.call(
            "read workers", lambda: self.redis.hgetall(self.keys.workers)
        )
        out: dict[str, WorkerStatus] = {}
        for name, payload in raw.items():
            key = name.decode() if isinstance(name, bytes) else str(name)
            try:
                out[key] = WorkerStatus.from_bytes(payload)
            except MessageError:
                continue  # a worker of another version: it reports itself on its own
        return out

    # -- keys holding the latest value ------------------------------------------------------

    def get(self, key: str, expected: type[_M]) -> _M | None:
        raw = self.call(f"read {key}", lambda: self.redis.get(key))
        return None if raw is None else decode(raw, expected)

    def put(self, key: str, message: Message) -> None:
        """Make ``message`` the value of ``key`` (the latest wins); :meth:`get` reads it."""
        self.put_raw(key, message.to_bytes())

    def get_raw(self, key: str) -> bytes | None:
        """A value that is not a ``messages`` model (the calibrated cost model's JSON)."""
        raw: Any = self.call(f"read {key}", lambda: self.redis.get(key))
        return None if raw is None else bytes(raw)

    def put_raw(self, key: str, payload: bytes | str) -> None:
        self.call(f"write {key}", lambda: self.redis.set(key, payload))

    def remove(self, key: str) -> bool:
        """Drop the value of ``key``; True when there was one."""
        return bool(self.call(f"remove {key}", lambda: self.redis.delete(key)))

    def latest_loads(self, workers: Sequence[str]) -> list[LoadReport]:
        """The LoadReport each of ``workers`` last put, in one round trip; a worker without one
        (not started) or with one this version cannot read is left out."""
        keys = [self.keys.load(name) for name in workers]
        raw: list[Any] = self.call("read loads", lambda: self.redis.mget(keys)) if keys else []
        reports = []
        for payload in raw:
            try:
                if payload is not None:
                    reports.append(decode(payload, LoadReport))
            except MessageError:
                continue
        return reports

    def increment(self, key: str) -> int:
        """Add 1 to the counter at ``key`` (0 when absent) and return it: it survives restarts
        of whoever counts, unlike a number held in memory."""
        return int(self.call(f"increment {key}", lambda: self.redis.incr(key)))

    def add_to_hash(self, key: str, amounts: Mapping[str, float]) -> None:
        """Add each amount to its field of the hash at ``key``, all or none (MULTI/EXEC)."""

        def add() -> None:
            pipe = self.redis.pipeline(transaction=True)
            for name, amount in amounts.items():
                pipe.hincrbyfloat(key, name, amount)
            pipe.execute()

        self.call(f"add to {key}", add)

    # -- an iteration's progress (the coordinator's view) -------------------------------------

    def samples_done(self, iteration: int) -> int:
        """Samples of ``iteration`` the generation workers finished (its done set)."""
        key = self.keys.done_samples(iteration)
        return int(self.call(f"count {key}", lambda: self.redis.scard(key)))

    def samples_scored(self, iteration: int) -> int:
        """Samples of ``iteration`` the inference worker scored (its scored set)."""
        key = self.keys.scored_samples(iteration)
        return int(self.call(f"count {key}", lambda: self.redis.scard(key)))

    def generation_stats(self, iteration: int) -> dict[str, float]:
        """The generation counters of ``iteration`` (what :meth:`add_to_hash` added)."""
        key = self.keys.generation_stats(iteration)
        raw: dict[Any, Any] = self.call(f"read {key}", lambda: self.redis.hgetall(key))
        return {_text(name): float(value) for name, value in raw.items()}

    def eval_scores_count(self, version: int) -> int:
        """Held-out samples of policy ``version`` scored so far (cheap: no payload read)."""
        key = self.keys.eval_scores(version)
        return int(self.call(f"count {key}", lambda: self.redis.hlen(key)))

    def eval_scores(self, version: int) -> list[EvalScore]:
        """The held-out scores of policy ``version``, one per sample."""
        key = self.keys.eval_scores(version)
        raw: dict[Any, Any] = self.call(f"read {key}", lambda: self.redis.hgetall(key))
        return [decode(payload, EvalScore) for payload in raw.values()]

    def coordinator_state(self) -> dict[str, str]:
        """The coordinator's state hash (its iteration, when it started, which tasks it
        published), which a restarted coordinator resumes from."""
        raw: dict[Any, Any] = self.call(
            "read state", lambda: self.redis.hgetall(self.keys.iteration)
        )
        return {_text(name): _text(value) for name, value in raw.items()}

    def update_coordinator_state(self, fields: Mapping[str, str | int | float]) -> None:
        """Set these fields of the state hash (the others stay)."""
        mapping: dict[Any, Any] = dict(fields)
        self.call("write state", lambda: self.redis.hset(self.keys.iteration, mapping=mapping))


def _text(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
