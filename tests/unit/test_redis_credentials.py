"""A refused Redis password fails at once, naming its Secret and key (issue #17, finding 6).

``redis.AuthenticationError`` subclasses ``ConnectionError``, which the bus retries for ten
minutes: a wrong password looked like an outage. These run against a real redis-server with
``requirepass`` (started on a free port, no engine) and against the retry helper alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.runtime import Bus, RedisCredentialsError, WorkerEnv, retrying

pytestmark = pytest.mark.timeout(60)
SOURCE = "Secret redis-auth, key password"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis"), password="right") as srv:
        yield srv


def _bus(server: RedisServer, password: str | None) -> Bus:
    environ = {
        "RLHFSPEC_JOB": "job",
        "RLHFSPEC_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
        "RLHFSPEC_REDIS_PASSWORD_SOURCE": SOURCE,
        "RLHFSPEC_JOB_CONFIG": "/nonexistent/job.yaml",
    }
    if password is not None:
        environ["RLHFSPEC_REDIS_PASSWORD"] = password
    return Bus(WorkerEnv.from_environ("trainer", environ))


@pytest.mark.parametrize("password", ["wrong", None], ids=["wrong", "missing"])
def test_refused_credentials_fail_at_once_naming_the_secret(
    server: RedisServer, password: str | None
) -> None:
    bus = _bus(server, password)
    started = time.monotonic()
    with pytest.raises(RedisCredentialsError) as caught:
        bus.wait_ready()
    assert time.monotonic() - started < 5  # not the 600 s outage budget
    assert SOURCE in str(caught.value)
    assert bus.outages == 0  # never reported as "redis unavailable"


def test_the_right_password_connects(server: RedisServer) -> None:
    _bus(server, "right").wait_ready()


def test_an_outage_is_still_retried() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("connection refused")
        return "ok"

    assert retrying(flaky, what="ping", on_retry=lambda _: None) == "ok"
    assert len(calls) == 3


def test_the_default_source_is_the_environment_variable() -> None:
    def refused() -> None:
        raise redis.AuthenticationError("WRONGPASS invalid username-password pair")

    with pytest.raises(RedisCredentialsError, match="RLHFSPEC_REDIS_PASSWORD"):
        retrying(refused, what="connect")
