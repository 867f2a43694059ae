"""Where a migrating sample's KV snapshot waits for its destination: the source's outbox.

Where it sits: on the source generation worker, between ``handover.Handover`` (which exports a
sample's KV blocks before aborting it and puts the encoded ``messages.KVSnapshot`` frame here)
and the destination worker (which pulls it over HTTP with :func:`pull`, once, when it admits
the migrated task whose ``kv_snapshot_url`` points here, and checks it in ``kv_intake``). The
bulk bytes go peer to peer, as vLLM's NIXL connector pulls KV from a prefill instance:
megabytes per sample through Redis would land in its append-only file (fsync'd on every write
in local mode, ~40 ms per 4 MB snapshot here) and in its memory. Only the small task crosses
Redis. A snapshot nobody pulls expires; a sample never depends on it: without it the
destination recomputes the prefix.

The port listens on every interface of a pod any other pod can reach, so nothing is served
without the job's key (``kv_auth``): a request without a valid pull token gets 403 and leaves
the snapshot in place for its real destination; every frame leaves sealed, so a destination
loads only what a worker of its own job put here.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .kv_auth import KVAuth, KVRefused

PATH_PREFIX = "/kv/"
TTL_SECONDS = 600.0
TOKEN_HEADER = "X-RLHFSpec-KV-Token"
MAX_URL_CHARS = 2048
SCHEMES = ("http", "https")


class KVOutbox:
    """Sealed snapshot frames by key, served once each on ``GET /kv/<key>`` to a request with
    a valid pull token, for ``ttl`` seconds."""

    def __init__(
        self, advertise_host: str, port: int = 0, *, auth: KVAuth, ttl: float = TTL_SECONDS
    ) -> None:
        self.ttl = ttl
        self.auth = auth
        self.refused = 0
        """Requests answered 403 (no or a wrong token): someone without the job's key."""
        self._frames: dict[str, tuple[float, bytes, bytes]] = {}
        """key -> (put time, frame, seal)."""
        self._lock = threading.Lock()
        outbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                if not path.startswith(PATH_PREFIX) or query:
                    self.send_error(404, "not a KV snapshot path")
                    return
                key = urllib.parse.unquote(path.removeprefix(PATH_PREFIX))
                # The token first: without the key, a caller learns nothing, not even whether
                # a snapshot exists, and takes nothing from its real destination.
                why = outbox.auth.check_pull_token(key, self.headers.get(TOKEN_HEADER))
                if why:
                    outbox.count_refused()
                    self.send_error(403, why)
                    return
                held = outbox.take(key)
                if held is None:
                    self.send_error(404, "no such KV snapshot (expired, taken, or never here)")
                    return
                frame, seal = held
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(frame) + len(seal)))
                self.end_headers()
                self.wfile.write(frame)
                self.wfile.write(seal)

            def log_message(self, format: str, *args: object) -> None:
                return  # one line per migrated sample would drown the worker's log

        self._server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.base_url = f"http://{advertise_host}:{self.port}{PATH_PREFIX}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="kv-outbox", daemon=True
        )
        self._thread.start()

    def put(self, key: str, frame: bytes) -> str:
        """Seal ``frame`` and hold it for one pull; returns the URL the destination pulls it
        from (no credential in it: the task carrying it crosses Redis)."""
        seal = self.auth.seal(key, frame)
        now = time.monotonic()
        with self._lock:
            for old in [k for k, (t, _, _) in self._frames.items() if now - t > self.ttl]:
                del self._frames[old]
            self._frames[key] = (now, frame, seal)
        return self.base_url + urllib.parse.quote(key, safe="")

    def take(self, key: str) -> tuple[bytes, bytes] | None:
        with self._lock:
            held = self._frames.pop(key, None)
        if held is None or time.monotonic() - held[0] > self.ttl:
            return None
        return held[1], held[2]

    def count_refused(self) -> None:
        with self._lock:
            self.refused += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def outbox_key(url: str) -> str:
    """The snapshot key in a peer outbox's URL; KVRefused("bad_url") for anything else: a
    scheme but http(s) (``file://`` would read this pod's own files), credentials, a query,
    another path, control characters."""
    if len(url) > MAX_URL_CHARS or not url.isascii() or any(c <= " " for c in url):
        raise KVRefused("bad_url", f"{url[:80]!r} is not a plain URL")
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # parsed on access: ValueError when it is not a port number
    except ValueError as exc:
        raise KVRefused("bad_url", f"{url[:80]!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise KVRefused("bad_url", f"scheme {parts.scheme!r} is not http(s)")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise KVRefused("bad_url", f"{url[:80]!r}: no host, or credentials in it")
    if parts.query or parts.fragment or not parts.path.startswith(PATH_PREFIX):
        raise KVRefused("bad_url", f"{url[:80]!r} is not a KV outbox path")
    key = urllib.parse.unquote(parts.path.removeprefix(PATH_PREFIX))
    if not key:
        raise KVRefused("bad_url", f"{url[:80]!r} names no snapshot")
    return key


def _opener() -> urllib.request.OpenerDirector:
    """Plain http(s) only: no redirects (a source cannot bounce the pull, and its token, to
    another host or scheme), no proxies (peers talk directly), no file/ftp/data handlers."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


_OPENER = _opener()


def pull(url: str, auth: KVAuth | None, *, timeout: float = 10.0) -> tuple[str, bytes]:
    """(key, sealed frame) from the peer outbox at ``url``, taken with this job's pull token.
    Every failure is a KVRefused with its reason: the caller recomputes either way."""
    key = outbox_key(url)
    if auth is None:
        raise KVRefused("no_key", "this worker has no KV key (RLHFSPEC_KV_SECRET)")
    request = urllib.request.Request(url, headers={TOKEN_HEADER: auth.pull_token(key)})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            body: bytes = response.read()
            return key, body
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise KVRefused("expired", "the source no longer holds it") from None
        if exc.code == 403:
            raise KVRefused("token", f"the source refused the pull ({exc.reason})") from None
        raise KVRefused("unreachable", f"HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise KVRefused("unreachable", repr(exc)) from None
