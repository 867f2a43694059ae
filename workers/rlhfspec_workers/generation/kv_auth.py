"""Who may pull a KV snapshot, and whether a pulled one is the one its source sent: HMACs.

Where it sits: under the KV migration path of the generation workers. The source's outbox
(``kv_outbox.KVOutbox``) seals every snapshot frame it holds (:meth:`KVAuth.seal`) and serves
it only to a request carrying a valid pull token (:meth:`KVAuth.check_pull_token`); the
destination mints that token (:meth:`KVAuth.pull_token`) and, once the bytes are in, checks the
seal (:meth:`KVAuth.open`) before anything of the snapshot reaches its engine
(``kv_intake``). Both sides hold the job's KV key (``RLHFSPEC_KV_SECRET``: the operator's
``<job>-kv`` Secret, or one per run in local mode), so nothing pulled from another job, nor
forged by a pod without the key, is ever served or loaded.

The token is minted by the destination, not handed out in the task: the task crosses Redis,
and a credential there would let anyone who reads Redis pull snapshots. Pure (hashlib, hmac):
no torch, no network.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Literal

TAG_BYTES = hashlib.sha256().digest_size
PULL_TOKEN_WINDOW = 120.0
"""Seconds a pull token is accepted either side of its timestamp: the destination mints it
when it sends the request, so this only has to cover clock skew between nodes."""
MIN_KEY_BYTES = 32

FallbackReason = Literal[
    "no_key",  # this worker has no KV key: it cannot authenticate a pull
    "bad_url",  # the task's URL is not an http(s) URL of a peer's outbox
    "unreachable",  # the source died, the network failed, or it answered oddly
    "expired",  # the source no longer holds the snapshot (taken, expired, restarted)
    "token",  # the source refused our pull token (another job's key)
    "unauthentic",  # the frame's seal does not verify: tampered, truncated, zeroed, forged
    "malformed",  # sealed by the job's key yet not a snapshot frame (a bug, dead-lettered)
    "wrong_sample",  # a genuine snapshot of another sample
    "block_size",  # the snapshot's cache blocks are not this engine's size
    "layout",  # its layers or block shape are not this engine's
    "dtype",  # its element type is not this engine's cache dtype
    "refused",  # this engine refused it on submit (e.g. its tokens are not the prompt's)
]
"""Why a destination recomputes a migrated sample's prefix instead of loading its KV: each
one is counted (``kv_fallback:<reason>`` in the iteration's generation stats)."""


class KVRefused(Exception):
    """A migrated sample's KV snapshot will not be loaded here; the sample recomputes."""

    def __init__(self, reason: FallbackReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: FallbackReason = reason
        self.detail = detail


class KVAuth:
    """The job's KV key, bound to the job's identity (``<namespace>/<job>``)."""

    def __init__(self, key: bytes, job: str) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a KV key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self._job = job.encode()

    def __repr__(self) -> str:
        return f"KVAuth(job={self._job.decode()!r})"  # never the key

    def _mac(self, purpose: bytes, key: str, *parts: bytes | memoryview) -> hmac.HMAC:
        # Purpose first: a pull token can never pass for a frame seal, nor the other way round.
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for label in (purpose, self._job, key.encode()):
            mac.update(len(label).to_bytes(4, "big") + label)  # lengths: no ambiguous splits
        for part in parts:
            mac.update(part)  # fed in place: a snapshot is megabytes, not copied to be hashed
        return mac

    # -- pulling ------------------------------------------------------------------------------

    def pull_token(self, key: str, now: float | None = None) -> str:
        """``<unix seconds>.<hex HMAC>``: the right to take snapshot ``key`` from a peer."""
        stamp = str(int(time.time() if now is None else now))
        return f"{stamp}.{self._mac(b'kv-pull', key, stamp.encode()).hexdigest()}"

    def check_pull_token(self, key: str, token: str | None, now: float | None = None) -> str:
        """Why ``token`` does not authorise pulling ``key`` ("" when it does)."""
        if not token:
            return "no pull token"
        stamp, _, digest = token.partition(".")
        if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
            return "malformed pull token"
        expected = self._mac(b"kv-pull", key, stamp.encode()).hexdigest()
        if not hmac.compare_digest(expected.encode(), digest.encode()):
            return "pull token mismatch"
        skew = abs((time.time() if now is None else now) - int(stamp))
        if skew > PULL_TOKEN_WINDOW:
            return f"pull token {int(skew)} s off this node's clock"
        return ""

    # -- sealing ------------------------------------------------------------------------------

    def seal(self, key: str, frame: bytes) -> bytes:
        """The tag appended to ``frame`` on the wire: HMAC over the job, the outbox key and
        every byte of the frame (header and KV data)."""
        return self._mac(b"kv-frame", key, frame).digest()

    def open(self, key: str, sealed: bytes) -> bytes:
        """The frame inside ``sealed`` (frame + tag), or KVRefused("unauthentic")."""
        if len(sealed) <= TAG_BYTES:
            raise KVRefused("unauthentic", f"{len(sealed)} bytes cannot hold a sealed frame")
        view = memoryview(sealed)
        frame, tag = view[:-TAG_BYTES], view[-TAG_BYTES:]
        if not hmac.compare_digest(self._mac(b"kv-frame", key, frame).digest(), tag):
            raise KVRefused("unauthentic", "seal does not verify (tampered, or another key)")
        return bytes(frame)
