"""How every Redis call of a worker survives an outage, and why refused credentials do not retry.

Where it sits: under ``runtime.Bus`` (``Bus.call`` runs each Redis command through
:func:`retrying`). A Redis outage makes calls retry with exponential backoff and report it on
stderr, so workers do not crash-loop while Redis restarts. Refused credentials are not an
outage: they raise :class:`RedisCredentialsError` at once, naming where the password came
from (the operator's Secret and key).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

import redis

_T = TypeVar("_T")

RETRY_SECONDS = 600.0
"""How long a call retries through an outage before it raises (a Redis pod's restart fits)."""
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
"""What an unreachable or still-loading Redis raises: retried, or waited out by a caller
that does not retry (``local.run``'s watcher restarts the redis-server meanwhile)."""


class RedisCredentialsError(RuntimeError):
    """Redis refused the password (or wants one that was not given): waiting cannot fix it."""


def retrying(
    call: Callable[[], _T],
    *,
    what: str,
    deadline_seconds: float = RETRY_SECONDS,
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
        except OUTAGE_ERRORS as exc:
            if time.monotonic() + delay > give_up:
                raise
            message = f"redis unavailable during {what} ({exc}); retrying in {delay:.1f}s"
            (on_retry or report_stderr)(message)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def report_stderr(message: str) -> None:
    """One ``[rlhfspec]`` line on stderr, flushed (the pod log shows it at once)."""
    print(f"[rlhfspec] {message}", file=sys.stderr, flush=True)
