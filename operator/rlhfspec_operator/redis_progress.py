"""Read the coordinator's progress from the job's Redis, tolerating outages; delete a job's keys.

Where it sits: the reconcile timer calls :meth:`ProgressReader.read` each tick and hands the
:class:`~rlhfspec_operator.progress.ProgressRead` to the pure status logic; the delete handler
calls :meth:`ProgressReader.delete_job_keys` for external Redis (nothing owns those keys, so
nothing else would remove them). A Redis that is starting, restarting or unreachable is a
normal state, never an exception: it becomes the CoordinatorReachable condition. Short
timeouts and no retries keep one slow Redis from stalling the operator's timers. A refused
password is not an outage: its reason is AuthenticationFailed and its message names the Secret
and key the password came from. ``rediss://`` servers are verified against the job's CA (or
the system's CAs).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthenticationWrongNumberOfArgsError, RedisError

from rlhfspec_operator.progress import ProgressRead
from rlhfspec_workers.messages import JobProgress, Keys, MessageError, StorageFull

DEFAULT_TIMEOUT = 2.0
_DELETE_BATCH = 500
AUTH_FAILED = "AuthenticationFailed"


@dataclass(frozen=True)
class RedisTarget:
    """One job's Redis as the operator reaches it."""

    url: str
    password: str | None = None
    password_source: str = "no password (spec.coordinator.passwordSecret is not set)"
    """Where ``password`` came from, e.g. ``Secret team-a/redis-auth, key password``."""
    ca_data: str | None = None
    """PEM CA bundle verifying a ``rediss://`` server (None: the system's CAs)."""


class ProgressReader:
    """Caches one client per target: a connection pool survives between ticks."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._timeout = timeout
        self._clients: dict[RedisTarget, aioredis.Redis] = {}

    def _client(self, target: RedisTarget) -> aioredis.Redis:
        client = self._clients.get(target)
        if client is None:
            tls: dict[str, Any] = {}
            if target.url.startswith("rediss://"):
                tls = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
                if target.ca_data is not None:
                    tls["ssl_ca_data"] = target.ca_data
            client = aioredis.Redis.from_url(
                target.url,
                password=target.password,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),
                **tls,
            )
            self._clients[target] = client
        return client

    async def _drop(self, target: RedisTarget) -> None:
        client = self._clients.pop(target, None)
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def read(self, target: RedisTarget, namespace: str, job: str) -> ProgressRead:
        keys = Keys(namespace, job)
        key = keys.progress
        try:
            raw, raw_full = await asyncio.wait_for(
                self._client(target).mget(key, keys.storage_full), timeout=self._timeout * 2
            )
        # AuthenticationError subclasses ConnectionError: caught first, it is not an outage.
        except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
            await self._drop(target)
            return ProgressRead(
                error=f"Redis refused the password from {target.password_source}: {exc}",
                error_reason=AUTH_FAILED,
                attempted=True,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            # A broken pool would keep failing: reconnect from scratch next time.
            await self._drop(target)
            return ProgressRead(error=f"{type(exc).__name__}: {exc}".rstrip(": "), attempted=True)
        full = None
        if raw_full is not None:
            try:
                full = StorageFull.from_bytes(raw_full)
            except MessageError as exc:  # still a report of a full disk, in another version
                full = StorageFull(worker="?", path="?", needed_bytes=0, free_bytes=0,
                                   message=f"storage full (unreadable report: {exc})")  # fmt: skip
        if raw is None:
            return ProgressRead(attempted=True, storage_full=full)
        try:
            return ProgressRead(
                progress=JobProgress.from_bytes(raw), attempted=True, storage_full=full
            )
        except MessageError as exc:
            return ProgressRead(
                error=f"{key}: {exc}", error_reason="InvalidProgress", attempted=True
            )

    async def delete_job_keys(self, target: RedisTarget, namespace: str, job: str) -> int:
        """Delete every key of the job (``rlhfspec:<namespace>:<job>:*``); return how many."""
        client = self._client(target)
        pattern = Keys(namespace, job).prefix + ":*"
        deleted = 0
        batch: list[bytes] = []
        async for key in client.scan_iter(match=pattern, count=_DELETE_BATCH):
            batch.append(key)
            if len(batch) >= _DELETE_BATCH:
                deleted += int(await client.delete(*batch))
                batch = []
        if batch:
            deleted += int(await client.delete(*batch))
        return deleted

    async def close(self) -> None:
        for target in list(self._clients):
            await self._drop(target)
