"""What every worker process shares: its environment, Redis with retries, streams, heartbeats.

Where it sits: ``rlhfspec worker ROLE`` (``entrypoint``) builds a :class:`WorkerEnv` from the
pod's environment (the operator's contract, also set by local mode), loads the job once, and
hands a :class:`Bus` to the role's loop (coordinator, generation, inference, trainer). The bus
wraps Redis: consumer groups on streams (every payload a ``messages`` model under the field
``data``), dead-lettering of payloads that do not parse, the stop flag and the heartbeat hash.
A Redis outage makes calls retry with exponential backoff and report it on stderr; workers do
not crash-loop. Refused credentials are not an outage: they raise :class:`RedisCredentialsError`
at once, naming where the password came from (the operator's Secret and key).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from rlhfspec_api.manifest import RLHFJob, load_rlhfjob
from rlhfspec_workers.messages import DeadLetter, Keys, Message, MessageError, WorkerStatus, decode
from rlhfspec_workers.observability.metrics import WorkerMetrics

log = logging.getLogger("rlhfspec.worker")

ROLES = ("coordinator", "generation", "inference", "trainer")
FIELD = b"data"
RECLAIM_SCAN_CALLS = 8
"""XAUTOCLAIM calls per reclaim: enough to walk every live worker's pending entries."""
_T = TypeVar("_T")
_M = TypeVar("_M", bound=Message)


class WorkerEnvError(ValueError):
    """The process environment does not satisfy the worker contract."""


class RedisCredentialsError(RuntimeError):
    """Redis refused the password (or wants one that was not given): waiting cannot fix it."""


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
        return f"{self.role}-{self.index}"

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


def retrying(
    call: Callable[[], _T],
    *,
    what: str,
    deadline_seconds: float = 600.0,
    on_retry: Callable[[str], None] | None = None,
    credentials: str = "RLHFSPEC_REDIS_PASSWORD",
) -> _T:
    """Run ``call``; on a Redis connection error back off (0.2 s doubling to 5 s) and retry
    until ``deadline_seconds``, reporting each outage once per attempt. A refused password
    raises :class:`RedisCredentialsError` at once (``credentials`` says where it came from)."""
    delay = 0.2
    give_up = time.monotonic() + deadline_seconds
    while True:
        try:
            return call()
        # AuthenticationError subclasses ConnectionError: it must be caught first, or a wrong
        # password would look like a 10-minute outage.
        except (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError) as exc:
            raise RedisCredentialsError(
                f"Redis refused the credentials during {what} ({exc}); the password comes from "
                f"{credentials}: fix that value (waiting will not help)"
            ) from exc
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            if time.monotonic() + delay > give_up:
                raise
            message = f"redis unavailable during {what} ({exc}); retrying in {delay:.1f}s"
            (on_retry or _stderr)(message)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _stderr(message: str) -> None:
    print(f"[rlhfspec] {message}", file=sys.stderr, flush=True)


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
            _stderr(f"{self.env.worker}: {message}")

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

    def _decode_entries(
        self, stream: str, group: str, expected: type[_M], reply: Any
    ) -> list[tuple[str, _M]]:
        out: list[tuple[str, _M]] = []
        for _, entries in reply or []:
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                if fields is None:  # trimmed while pending
                    self.ack(stream, group, entry_id)
                    continue
                raw = fields.get(FIELD, b"")
                try:
                    out.append((entry_id, decode(raw, expected)))
                except MessageError as exc:
                    self.dead_letter(stream, entry_id, raw, str(exc))
                    self.ack(stream, group, entry_id)
        return out

    def ack(self, stream: str, group: str, *entry_ids: str) -> None:
        if entry_ids:
            self.call(f"ack {stream}", lambda: self.redis.xack(stream, group, *entry_ids))

    def dead_letter(self, stream: str, entry_id: str, raw: bytes | str, reason: str) -> None:
        """Keep a payload nobody can use, with the reason; log it with the sample id."""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        sample_id = _sample_id_of(text)
        letter = DeadLetter(
            source_stream=stream, entry_id=entry_id, sample_id=sample_id, reason=reason, raw=text
        )
        self.publish(self.keys.dead_letters, letter)
        where = f"{stream} {entry_id} (sample {sample_id})"
        _stderr(f"{self.env.worker}: dead-lettered {where}: {reason}")

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

    def get(self, key: str, expected: type[_M]) -> _M | None:
        raw = self.call(f"read {key}", lambda: self.redis.get(key))
        return None if raw is None else decode(raw, expected)


def _sample_id_of(text: str) -> str | None:
    """Best effort: the sample id of a payload that failed validation (for the log)."""
    import json

    try:
        body = json.loads(text)
    except ValueError:
        return None
    if isinstance(body, dict):
        for holder in (body, body.get("rollout")):
            if isinstance(holder, dict) and isinstance(holder.get("sample_id"), str):
                return str(holder["sample_id"])
    return None
