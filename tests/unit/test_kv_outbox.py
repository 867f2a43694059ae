"""The source's KV outbox: each snapshot frame is served once over real HTTP, then gone; an
unknown or expired one is a 404 the destination turns into a recompute."""

from __future__ import annotations

import time

import pytest

from rlhfspec_workers.generation.kv_outbox import KVOutbox, pull


def test_a_frame_is_pulled_once_and_then_is_gone() -> None:
    outbox = KVOutbox("127.0.0.1")
    try:
        frame = bytes(range(256)) * 4096  # 1 MiB of binary
        url = outbox.put("it3/p1/0#1", frame)
        assert url.startswith(f"http://127.0.0.1:{outbox.port}/kv/") and len(outbox) == 1
        assert pull(url) == frame
        assert pull(url) is None and len(outbox) == 0
        assert pull(url.replace("p1", "p2")) is None
    finally:
        outbox.close()


def test_an_expired_frame_is_not_served() -> None:
    outbox = KVOutbox("127.0.0.1", ttl=0.05)
    try:
        url = outbox.put("s#1", b"x")
        time.sleep(0.1)
        assert pull(url) is None
        outbox.put("s#2", b"y")  # putting prunes what expired
        assert len(outbox) == 1
    finally:
        outbox.close()


def test_a_dead_source_raises_so_the_destination_recomputes() -> None:
    outbox = KVOutbox("127.0.0.1")
    url = outbox.put("s#1", b"x")
    outbox.close()
    with pytest.raises(OSError):
        pull(url, timeout=2.0)
