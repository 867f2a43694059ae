"""Where a migrating sample's KV snapshot waits for its destination: the source's outbox.

Where it sits: on the source generation worker, between ``handover.Handover`` (which exports a
sample's KV blocks before aborting it and puts the encoded ``messages.KVSnapshot`` frame here)
and the destination worker (which pulls it over HTTP, once, when it admits the migrated task
whose ``kv_snapshot_url`` points here). The bulk bytes go peer to peer, as vLLM's NIXL
connector pulls KV from a prefill instance: megabytes per sample through Redis would land in
its append-only file (fsync'd on every write in local mode, ~40 ms per 4 MB snapshot here) and
in its memory. Only the small task crosses Redis. A snapshot nobody pulls expires; a sample
never depends on it: without it the destination recomputes the prefix.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATH_PREFIX = "/kv/"
TTL_SECONDS = 600.0


class KVOutbox:
    """Snapshot frames by key, served once each on ``GET /kv/<key>``, for ``ttl`` seconds."""

    def __init__(self, advertise_host: str, port: int = 0, *, ttl: float = TTL_SECONDS) -> None:
        self.ttl = ttl
        self._frames: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()
        outbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                key = urllib.parse.unquote(self.path.removeprefix(PATH_PREFIX))
                frame = outbox.take(key) if self.path.startswith(PATH_PREFIX) else None
                if frame is None:
                    self.send_error(404, "no such KV snapshot (expired, taken, or never here)")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(frame)))
                self.end_headers()
                self.wfile.write(frame)

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
        """Hold ``frame`` for one pull; returns the URL the destination pulls it from."""
        now = time.monotonic()
        with self._lock:
            for old in [k for k, (t, _) in self._frames.items() if now - t > self.ttl]:
                del self._frames[old]
            self._frames[key] = (now, frame)
        return self.base_url + urllib.parse.quote(key, safe="")

    def take(self, key: str) -> bytes | None:
        with self._lock:
            held = self._frames.pop(key, None)
        if held is None or time.monotonic() - held[0] > self.ttl:
            return None
        return held[1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def pull(url: str, *, timeout: float = 10.0) -> bytes | None:
    """The frame at ``url``; None when the source no longer has it (404). Other failures (the
    source died, the network) raise OSError: the caller recomputes either way."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
