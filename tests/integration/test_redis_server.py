"""The embedded redis-server: starts, persists acknowledged writes across a crash, reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from rlhfspec_workers.local import redis_server
from rlhfspec_workers.local.redis_server import RedisNotInstalledError, RedisServer


def test_write_survives_kill_and_restart_with_aof(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password="s3cret")
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.xadd("stream", {"sample": "7"})
        client.set("acknowledged", "yes")
        server.kill()  # a crash, not a clean shutdown
        assert not server.ping()
        server.restart()
        client = redis.Redis.from_url(server.url)
        assert client.get("acknowledged") == b"yes"
        assert client.xlen("stream") == 1
    finally:
        server.stop()
    assert not server.ping()


def test_password_is_required(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", password="pw") as server:
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.set("x", 1)


def test_missing_binary_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    with pytest.raises(RedisNotInstalledError, match="apt-get install redis-server"):
        RedisServer(Path("/tmp/unused")).start()
