"""Read the coordinator's progress from the job's Redis, tolerating outages; delete a job's keys.

Where it sits: the reconcile timer calls :meth:`ProgressReader.read` each tick and hands the
:class:`~rlhfspec_operator.progress.ProgressRead` to the pure status logic; the delete handler
calls :meth:`ProgressReader.delete_job_keys` for external Redis (nothing owns those keys, so
nothing else would remove them). A Redis that is starting, restarting or unreachable is a
normal state, never an exception: it becomes the CoordinatorReachable condition. Short
timeouts and no retries keep one slow Redis from stalling the operator's timers.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from rlhfspec_operator.progress import ProgressRead
from rlhfspec_workers.messages import JobProgress, Keys, MessageError

DEFAULT_TIMEOUT = 2.0
_DELETE_BATCH = 500


class ProgressReader:
    """Caches one client per (url, password): a connection pool survives between ticks."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._timeout = timeout
        self._clients: dict[tuple[str, str | None], aioredis.Redis] = {}

    def _client(self, url: str, password: str | None) -> aioredis.Redis:
        key = (url, password)
        client = self._clients.get(key)
        if client is None:
            client = aioredis.Redis.from_url(
                url,
                password=password,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._clients[key] = client
        return client

    async def _drop(self, url: str, password: str | None) -> None:
        client = self._clients.pop((url, password), None)
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def read(self, url: str, password: str | None, namespace: str, job: str) -> ProgressRead:
        key = Keys(namespace, job).progress
        try:
            raw = await asyncio.wait_for(
                self._client(url, password).get(key), timeout=self._timeout * 2
            )
        except (RedisError, OSError, TimeoutError) as exc:
            # A broken pool would keep failing: reconnect from scratch next time.
            await self._drop(url, password)
            return ProgressRead(error=f"{type(exc).__name__}: {exc}".rstrip(": "), attempted=True)
        if raw is None:
            return ProgressRead(attempted=True)
        try:
            return ProgressRead(progress=JobProgress.from_bytes(raw), attempted=True)
        except MessageError as exc:
            return ProgressRead(
                error=f"{key}: {exc}", error_reason="InvalidProgress", attempted=True
            )

    async def delete_job_keys(
        self, url: str, password: str | None, namespace: str, job: str
    ) -> int:
        """Delete every key of the job (``rlhfspec:<namespace>:<job>:*``); return how many."""
        client = self._client(url, password)
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
        for url, password in list(self._clients):
            await self._drop(url, password)
