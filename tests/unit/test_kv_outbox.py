"""The source's KV outbox over real HTTP: a snapshot frame is served once, sealed, and only to
a pull carrying this job's token; anyone else gets 403 and takes nothing. The pull side goes
only to a peer outbox's http(s) URL, and every failure is a named reason to recompute."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhfspec_workers.generation.kv_auth import KVAuth, KVRefused
from rlhfspec_workers.generation.kv_outbox import TOKEN_HEADER, KVOutbox, outbox_key, pull

AUTH = KVAuth(b"k" * 32, "team-a/tiny-grpo")
FRAME = bytes(range(256)) * 4096  # 1 MiB of binary


@pytest.fixture()
def outbox() -> Iterator[KVOutbox]:
    box = KVOutbox("127.0.0.1", auth=AUTH)
    yield box
    box.close()


def _reason(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(KVRefused) as refused:
        call(*args, **kwargs)  # type: ignore[operator]
    return refused.value.reason


def _get(url: str, token: str | None) -> int:
    headers = {TOKEN_HEADER: token} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_frame_is_pulled_once_sealed_and_then_is_gone(outbox: KVOutbox) -> None:
    url = outbox.put("it3/p1/0#1", FRAME)
    assert url == f"http://127.0.0.1:{outbox.port}/kv/it3%2Fp1%2F0%231" and len(outbox) == 1
    assert "?" not in url  # no credential in the task that carries the URL through Redis
    key, sealed = pull(url, AUTH)
    assert key == "it3/p1/0#1" and AUTH.open(key, sealed) == FRAME
    assert _reason(pull, url, AUTH) == "expired" and len(outbox) == 0
    assert _reason(pull, url.replace("p1", "p2"), AUTH) == "expired"


def test_a_pull_without_the_jobs_token_is_refused_and_takes_nothing(outbox: KVOutbox) -> None:
    url = outbox.put("it0/p0/0#1", FRAME)
    other_job = KVAuth(b"k" * 32, "team-b/tiny-grpo")  # same bytes, another job's identity
    other_key = KVAuth(b"x" * 32, "team-a/tiny-grpo")  # the same job name, another key
    stale = AUTH.pull_token("it0/p0/0#1", now=time.time() - 600)
    refused = [
        _get(url, None),
        _get(url, ""),
        _get(url, "garbage"),
        _get(url, "123.abc"),
        _get(url, AUTH.pull_token("it0/p0/0#2")),  # a token for another snapshot
        _get(url, other_job.pull_token("it0/p0/0#1")),
        _get(url, stale),
        _get(url.replace("0%231", "0%239"), None),  # absent: still 403, existence not revealed
    ]
    assert refused == [403] * 8 and outbox.refused == 8
    assert _reason(pull, url, other_key) == "token"
    assert len(outbox) == 1  # still there for its real destination
    assert AUTH.open(*pull(url, AUTH)) == FRAME


def test_an_expired_frame_is_not_served() -> None:
    outbox = KVOutbox("127.0.0.1", auth=AUTH, ttl=0.05)
    try:
        url = outbox.put("s#1", b"x")
        time.sleep(0.1)
        assert _reason(pull, url, AUTH) == "expired"
        outbox.put("s#2", b"y")  # putting prunes what expired
        assert len(outbox) == 1
    finally:
        outbox.close()


def test_a_dead_source_is_unreachable_so_the_destination_recomputes() -> None:
    outbox = KVOutbox("127.0.0.1", auth=AUTH)
    url = outbox.put("s#1", b"x")
    outbox.close()
    assert _reason(pull, url, AUTH, timeout=2.0) == "unreachable"


def test_a_worker_without_the_key_pulls_nothing(outbox: KVOutbox) -> None:
    url = outbox.put("s#1", FRAME)
    assert _reason(pull, url, None) == "no_key" and len(outbox) == 1


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "file:///kv/s%231",
        "ftp://127.0.0.1/kv/s%231",
        "gopher://127.0.0.1:70/kv/s",
        "data:text/plain,/kv/s",
        "/kv/s%231",
        "http:///kv/s%231",
        "http://user:pw@127.0.0.1:1/kv/s",
        "http://127.0.0.1:1/kv/s?t=1",
        "http://127.0.0.1:1/kv/s#frag",
        "http://127.0.0.1:1/other/s",
        "http://127.0.0.1:1/kv/",
        "http://127.0.0.1:notaport/kv/s",
        "http://127.0.0.1:1/kv/s\r\nX-Injected: 1",
        "http://127.0.0.1:1/kv/s t",
        "http://127.0.0.1:1/kv/sé",
        "http://127.0.0.1:1/kv/" + "s" * 3000,
    ],
)
def test_anything_but_a_peer_outboxs_http_url_is_refused_unopened(url: str) -> None:
    with pytest.raises(KVRefused) as refused:
        pull(url, AUTH)
    assert refused.value.reason == "bad_url"


def test_peer_urls_name_their_snapshot() -> None:
    assert outbox_key("http://tiny-grpo-generation-1.tiny-grpo-generation.team-a.svc:9401"
                      "/kv/it3%2Fp1%2F0%231") == "it3/p1/0#1"  # fmt: skip
    assert outbox_key("HTTPS://[::1]:9401/kv/s%231") == "s#1"


def test_a_redirect_is_not_followed() -> None:
    """A source answering 302 cannot bounce the pull (and its token) elsewhere."""
    hits: list[str] = []

    class Target(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_error(404)

        def log_message(self, format: str, *args: object) -> None:
            return

    target = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    threading.Thread(target=target.serve_forever, daemon=True).start()

    class Redirect(Target):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_address[1]}/kv/s%231")
            self.end_headers()

    source = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=source.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{source.server_address[1]}/kv/s%231"
        with pytest.raises(KVRefused, match="HTTP 302") as refused:
            pull(url, AUTH)
        assert refused.value.reason == "unreachable" and hits == []
    finally:
        for server in (source, target):
            server.shutdown()
            server.server_close()
