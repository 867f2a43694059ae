"""How every Redis call of a worker survives an outage, and why refused credentials do not retry.

Where it sits: under ``runtime.Bus`` (``Bus.call`` runs each Redis command through
:func:`retrying`). A Redis outage makes calls retry with exponential backoff and report it on
stderr, so workers do not crash-loop while Redis restarts. Refused credentials are not an
outage: they raise :class:`RedisCredentialsError` at once, naming where the password came
from (the operator's Secret and key). An outage longer than the retry limit (a network
partition, a Redis that never comes back) raises :class:`RedisUnreachableError`, naming the
limit: ``rlhfspec worker`` then exits 3 and Kubernetes starts the pod again, which rejoins once
Redis answers (everything it had not acked is redelivered to it).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import redis

_T = TypeVar("_T")

RETRY_SECONDS = 600.0
"""How long a call retries through an outage before it raises (a Redis pod's restart fits)."""
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
"""What an unreachable or still-loading Redis raises: retried, or waited out by a caller
that does not retry (``local.run``'s watcher restarts the redis-server meanwhile)."""


RETRY_SECONDS_ENV = "RLHFSPEC_REDIS_RETRY_SECONDS"
"""Overrides :data:`RETRY_SECONDS` for every call of a worker. For tests only (the partition
test waits seconds, not ten minutes); never set it in production."""


class RedisCredentialsError(RuntimeError):
    """Redis refused the password (or wants one that was not given): waiting cannot fix it."""


class RedisUnreachableError(redis.ConnectionError):
    """Redis did not answer for longer than the retry limit. A ``ConnectionError``, so code
    that waits out outages itself (``OUTAGE_ERRORS``) still catches it."""


class RetryLimitError(ValueError):
    """:data:`RETRY_SECONDS_ENV` holds something other than a positive number of seconds."""


def retry_seconds_from_environ(environ: Mapping[str, str] | None = None) -> float:
    """The retry limit: :data:`RETRY_SECONDS`, or :data:`RETRY_SECONDS_ENV`'s value when set
    (a finite number of seconds > 0; anything else raises :class:`RetryLimitError`)."""
    raw = (os.environ if environ is None else environ).get(RETRY_SECONDS_ENV)
    if raw is None:
        return RETRY_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise RetryLimitError(
            f"{RETRY_SECONDS_ENV}={raw!r}: expected a number of seconds > 0 "
            f"(unset: {RETRY_SECONDS:g}; it is for tests only)"
        )
    return seconds


def retrying(
    call: Callable[[], _T],
    *,
    what: str,
    deadline_seconds: float = RETRY_SECONDS,
    on_retry: Callable[[str], None] | None = None,
    credentials: str = "RLHFSPEC_REDIS_PASSWORD",
) -> _T:
    """Run ``call``; on a Redis connection error back off (0.2 s doubling to 5 s) and retry
    until ``deadline_seconds``, reporting each outage once per attempt, then raise
    :class:`RedisUnreachableError` naming the limit (``deadline_seconds`` 0: the outage's own
    error at once, for a caller that waits it out itself). A refused password raises
    :class:`RedisCredentialsError` at once (``credentials`` says where it came from)."""
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
                if deadline_seconds <= 0:
                    raise
                waited = time.monotonic() - give_up + deadline_seconds
                raise RedisUnreachableError(
                    f"Redis unreachable for {waited:.0f}s during {what}, past the retry limit "
                    f"of {deadline_seconds:g}s ({exc}); exiting so the pod is restarted "
                    f"(it rejoins once Redis answers)"
                ) from exc
            message = f"redis unavailable during {what} ({exc}); retrying in {delay:.1f}s"
            (on_retry or report_stderr)(message)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def report_stderr(message: str) -> None:
    """One ``[rlhfspec]`` line on stderr, flushed (the pod log shows it at once)."""
    print(f"[rlhfspec] {message}", file=sys.stderr, flush=True)
