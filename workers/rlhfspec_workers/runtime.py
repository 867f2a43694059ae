"""What every worker process shares: its environment, Redis with retries, streams, heartbeats.

Where it sits: ``rlhfspec worker ROLE`` (``entrypoint``) builds a :class:`WorkerEnv` from the
pod's environment (the operator's contract, also set by local mode), loads the job once, and
hands a :class:`Bus` to the role's loop (coordinator, generation, inference, trainer). The bus
is the only code of the roles that talks to Redis: consumer groups on streams and readers with
a :class:`StreamCursor` (every payload a ``messages`` model under the field :data:`FIELD`;
one that does not parse is dead-lettered), keys holding the latest message, counters, the stop
flag and the heartbeat hash. Every call goes through ``redis_retry.retrying``: an outage is
retried with backoff, refused credentials raise :class:`RedisCredentialsError` at once.
Worker names (consumer names, heartbeat fields, key suffixes) are :func:`worker_name`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import redis

from rlhfspec_api.manifest import RLHFJob, load_rlhfjob
from rlhfspec_workers.dead_letters import dead_letter_of
from rlhfspec_workers.messages import FIELD as FIELD
from rlhfspec_workers.messages import Keys, Message, MessageError, WorkerStatus, decode
from rlhfspec_workers.observability.metrics import WorkerMetrics
from rlhfspec_workers.redis_retry import RedisCredentialsError as RedisCredentialsError
from rlhfspec_workers.redis_retry import report_stderr, retrying
from rlhfspec_workers.worker_names import ROLES as ROLES
from rlhfspec_workers.worker_names import WorkerName as WorkerName
from rlhfspec_workers.worker_names import parse_worker_name as parse_worker_name
from rlhfspec_workers.worker_names import worker_name as worker_name

log = logging.getLogger("rlhfspec.worker")

RECLAIM_SCAN_CALLS = 8
"""XAUTOCLAIM calls per reclaim: enough to walk every live worker's pending entries."""
_T = TypeVar("_T")
_M = TypeVar("_M", bound=Message)


class WorkerEnvError(ValueError):
    """The process environment does not satisfy the worker contract."""


@dataclass(frozen=True)
class WorkerEnv:
    """The operator -> worker contract (environment variables of every worker pod)."""

    job: str
    namespace: str
    role: str
    index: int
    replicas: int
    redis_url: str
    redis_password: str | None
    job_config: Path
    storage: Path
    metrics_port: int
    pod_name: str
    kv_port: int = 0
    """Where a generation worker serves KV snapshots of samples it migrates away (0: any free
    port, local mode)."""
    kv_host: str = "127.0.0.1"
    """How other workers reach it: the operator sets the pod's DNS name (hostname.subdomain of
    its role's headless service); local mode keeps the loopback."""
    kv_secret: str | None = field(default=None, repr=False)
    """The job's KV key (generation workers): pulls of KV snapshots are authorised with it and
    snapshots sealed with it (``generation.kv_auth``). The operator's ``<job>-kv`` Secret, one
    per run in local mode; without it a worker neither serves nor loads snapshots."""
    redis_password_source: str = "RLHFSPEC_REDIS_PASSWORD"
    """Where the password comes from, for the error when Redis refuses it (the operator names
    the Secret and key)."""
    redis_ca_file: Path | None = None
    """CA bundle that verifies a ``rediss://`` server (None: the system's CAs)."""
    local: bool = False
    """Started by local mode (``RLHFSPEC_LOCAL=1``), which may read this machine's files;
    anything else is a cluster pod, where preflight refuses paths on the pod's filesystem."""

    @property
    def worker(self) -> str:
        """Stable name of this worker (its consumer name in Redis groups)."""
        return worker_name(self.role, self.index)

    @classmethod
    def from_environ(cls, role: str, environ: Mapping[str, str] | None = None) -> WorkerEnv:
        env = os.environ if environ is None else environ
        if role not in ROLES:
            raise WorkerEnvError(f"role {role!r} unknown (allowed: {', '.join(ROLES)})")
        missing = [
            name
            for name in ("RLHFSPEC_JOB", "RLHFSPEC_REDIS_URL", "RLHFSPEC_JOB_CONFIG")
            if not env.get(name)
        ]
        if missing:
            raise WorkerEnvError(f"environment variable(s) {', '.join(missing)} not set")
        declared = env.get("RLHFSPEC_ROLE")
        if declared and declared != role:
            raise WorkerEnvError(f"RLHFSPEC_ROLE is {declared!r} but the command runs {role!r}")

        def number(name: str, default: int) -> int:
            raw = env.get(name, str(default))
            try:
                return int(raw)
            except ValueError:
                raise WorkerEnvError(f"{name}={raw!r} is not an integer") from None

        return cls(
            job=env["RLHFSPEC_JOB"],
            namespace=env.get("RLHFSPEC_NAMESPACE", "default"),
            role=role,
            index=number("RLHFSPEC_WORKER_INDEX", 0),
            replicas=number("RLHFSPEC_REPLICAS", 1),
            redis_url=env["RLHFSPEC_REDIS_URL"],
            redis_password=env.get("RLHFSPEC_REDIS_PASSWORD") or None,
            job_config=Path(env["RLHFSPEC_JOB_CONFIG"]),
            storage=Path(env.get("RLHFSPEC_STORAGE", "/data")),
            metrics_port=number("RLHFSPEC_METRICS_PORT", 0),
            pod_name=env.get("RLHFSPEC_POD_NAME", ""),
            kv_port=number("RLHFSPEC_KV_PORT", 0),
            kv_host=env.get("RLHFSPEC_KV_HOST") or "127.0.0.1",
            kv_secret=_kv_secret(env.get("RLHFSPEC_KV_SECRET")),
            redis_password_source=env.get("RLHFSPEC_REDIS_PASSWORD_SOURCE")
            or "RLHFSPEC_REDIS_PASSWORD",
            redis_ca_file=Path(env["RLHFSPEC_REDIS_CA_FILE"])
            if env.get("RLHFSPEC_REDIS_CA_FILE")
            else None,
            local=env.get("RLHFSPEC_LOCAL") == "1",
        )

    def load_job(self) -> RLHFJob:
        return load_rlhfjob(self.job_config)


MIN_KV_SECRET_CHARS = 32


def _kv_secret(raw: str | None) -> str | None:
    if not raw:
        return None
    if len(raw) < MIN_KV_SECRET_CHARS:  # a guessable key would authorise anyone
        raise WorkerEnvError(
            f"RLHFSPEC_KV_SECRET has {len(raw)} characters, at least {MIN_KV_SECRET_CHARS} needed"
        )
    return raw


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
    """One worker's view of the job's Redis: streams, groups, flags and heartbeats."""

    def __init__(
        self,
        env: WorkerEnv,
        *,
        client: redis.Redis | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
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
        self.outages = 0

    def call(self, what: str, fn: Callable[[], _T]) -> _T:
        def report(message: str) -> None:
            self.outages += 1
            report_stderr(f"{self.env.worker}: {message}")

        return retrying(fn, what=what, on_retry=report, credentials=self.env.redis_password_source)

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

    def read_group(
        self,
        stream: str,
        group: str,
        expected: type[_M],
        *,
        count: int,
        block_ms: int | None,
        pending: bool = False,
    ) -> list[tuple[str, _M]]:
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
    ) -> list[tuple[str, _M]]:
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
        self, cursor: StreamCursor[_M], *, count: int | None = None
    ) -> list[tuple[str, _M]]:
        """Entries after ``cursor`` (oldest first, at most ``count``; returns at once), decoded;
        the cursor moves past all of them, the dead-lettered ones included."""
        stream = cursor.stream
        reply: Any = self.call(
            f"read {stream}", lambda: self.redis.xread({stream: cursor.last_id}, count=count)
        )
        for _, entries in reply or []:
            if entries:
                cursor.last_id = _text(entries[-1][0])
        return self._decode_entries(stream, None, cursor.expected, reply)

    def last_entry_id(self, stream: str) -> str:
        """The newest entry's id ("0-0" while the stream is empty or absent)."""
        last: Any = self.call(f"read {stream}", lambda: self.redis.xrevrange(stream, count=1))
        return _text(last[0][0]) if last else "0-0"

    def _decode_entries(
        self, stream: str, group: str | None, expected: type[_M], reply: Any
    ) -> list[tuple[str, _M]]:
        """The one read loop: each entry of an XREAD/XREADGROUP-shaped ``reply`` decoded as
        ``expected``; one that does not decode is dead-lettered and, read through ``group``,
        acked (the dead-letter stream keeps it, so it never stays pending)."""
        out: list[tuple[str, _M]] = []
        for _, entries in reply or []:
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                if fields is None:  # trimmed while pending (only group reads see these)
                    if group is not None:
                        self.ack(stream, group, entry_id)
                    continue
                raw = fields.get(FIELD, b"")
                try:
                    out.append((entry_id, decode(raw, expected)))
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


def _text(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
