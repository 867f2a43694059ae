"""Download an ``s3://BUCKET/KEY`` object, or every object under ``KEY/`` (a model directory),
from S3 or an S3-compatible store, over plain HTTP(S) with Signature Version 4.

Where it sits: called by ``fetch.cli`` through ``store.install``, which hands it a fresh
directory and renames that into place afterwards. The worker image has no S3 client library,
and a download needs only two requests: ListObjectsV2 (``GET /BUCKET?list-type=2&prefix=``)
and GetObject, each signed with the access key the init container takes from the Secrets
``spec.credentials.s3`` names (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``); without keys
the requests go unsigned (a public bucket). ``AWS_ENDPOINT_URL`` (``spec.credentials.s3.
endpoint``) selects an S3-compatible store, addressed path-style (``ENDPOINT/BUCKET/KEY``);
without it, AWS in ``AWS_REGION`` (default us-east-1), virtual-hosted
(``https://BUCKET.s3.REGION.amazonaws.com/KEY``).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import os
import shutil
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit

from rlhfspec_workers.fetch.store import FetchError, RemoteLocation

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DEFAULT_REGION = "us-east-1"
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0
_XMLNS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@dataclass(frozen=True)
class Keys:
    access_key_id: str
    secret_access_key: str


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    keys: Keys,
    region: str,
    when: datetime.datetime,
) -> dict[str, str]:
    """``headers`` plus ``x-amz-date``, ``x-amz-content-sha256`` (an empty body) and the
    SigV4 ``Authorization`` for ``method url``; every header given is signed."""
    parts = urlsplit(url)
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    signed = {k.lower(): " ".join(v.split()) for k, v in headers.items()}
    signed.setdefault("host", parts.netloc)
    signed["x-amz-date"] = stamp
    signed["x-amz-content-sha256"] = EMPTY_SHA256
    names = sorted(signed)
    query = sorted(
        (quote(unquote(k), safe="-_.~"), quote(unquote(v), safe="-_.~"))
        for k, _, v in (item.partition("=") for item in parts.query.split("&") if item)
    )
    canonical = "\n".join(
        [
            method,
            quote(unquote(parts.path) or "/", safe="/-_.~"),
            "&".join(f"{k}={v}" for k, v in query),
            "".join(f"{name}:{signed[name]}\n" for name in names),
            ";".join(names),
            EMPTY_SHA256,
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _hmac(f"AWS4{keys.secret_access_key}".encode(), day)
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={keys.access_key_id}/{scope},"
        f"SignedHeaders={';'.join(names)},Signature={signature}"
    )
    return {**dict(headers), "x-amz-date": stamp, "x-amz-content-sha256": EMPTY_SHA256,
            "Authorization": authorization}  # fmt: skip


class _Client:
    def __init__(self, location: RemoteLocation, env: Mapping[str, str]) -> None:
        self.location = location
        self.bucket = location.repo_id
        self.region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
        self.endpoint = (env.get("AWS_ENDPOINT_URL") or "").rstrip("/")
        key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        self.keys = Keys(key_id, secret) if key_id and secret else None

    def url(self, key: str, query: str = "") -> str:
        path = quote(key, safe="/-_.~")
        base = (
            f"{self.endpoint}/{self.bucket}"
            if self.endpoint
            else f"https://{self.bucket}.s3.{self.region}.amazonaws.com"
        )
        return f"{base}/{path}" + (f"?{query}" if query else "")

    def open(self, url: str) -> urllib.request.Request:
        headers = {"User-Agent": "rlhfspec-fetch"}
        if self.keys is not None:
            now = datetime.datetime.now(datetime.UTC)
            headers = sign("GET", url, headers, self.keys, self.region, now)
        return urllib.request.Request(url, headers=headers)

    def get(self, url: str, what: str) -> bytes:
        with self._response(url, what) as response:
            return bytes(response.read())

    def _response(self, url: str, what: str) -> http.client.HTTPResponse:
        try:
            response: http.client.HTTPResponse = urllib.request.urlopen(
                self.open(url), timeout=TIMEOUT_SECONDS
            )
            return response
        except urllib.error.HTTPError as exc:
            hint = ""
            if exc.code in (401, 403):
                hint = " (a private bucket needs spec.credentials.s3 keys)"
            raise FetchError(
                self.location.uri, f"{what} failed: HTTP {exc.code} {exc.reason}{hint}", exc.code
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError(
                self.location.uri, f"{what} failed: no HTTP response ({reason})"
            ) from None

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (ListObjectsV2, following continuation tokens)."""
        keys: list[str] = []
        token = ""
        while True:
            query = f"list-type=2&prefix={quote(prefix, safe='')}"
            if token:
                query += f"&continuation-token={quote(token, safe='')}"
            body = self.get(self.url("", query), "listing the bucket")
            try:
                root = ElementTree.fromstring(body)
            except ElementTree.ParseError as exc:
                raise FetchError(self.location.uri, f"unreadable bucket listing: {exc}") from None
            keys += [e.text or "" for e in root.iter(f"{_XMLNS}Key")]
            if root.findtext(f"{_XMLNS}IsTruncated") != "true":
                return keys
            token = root.findtext(f"{_XMLNS}NextContinuationToken") or ""

    def download(self, key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        with (
            self._response(self.url(key), f"downloading {key}") as response,
            partial.open("wb") as out,
        ):
            shutil.copyfileobj(response, out, CHUNK_BYTES)
        partial.rename(target)


def _relative(location: RemoteLocation, key: str, prefix: str) -> PurePosixPath:
    """Where the object ``key`` goes below the download directory; a key that would leave it
    (a store is free to hold ``m/../../x``) is refused."""
    relative = PurePosixPath(key[len(prefix) :])
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise FetchError(location.uri, f"object key {key!r} would land outside the directory")
    return relative


def download_s3(
    location: RemoteLocation, into: Path, environ: Mapping[str, str] | None = None
) -> dict[str, str] | None:
    """Download the object ``KEY`` into ``into`` under its own name (returning ``{"file":
    NAME}`` for the download record), or, when objects exist under ``KEY/``, all of them with
    their paths below it; FetchError naming the URI and the HTTP status on failure."""
    client = _Client(location, os.environ if environ is None else environ)
    key = location.sub_path
    prefix = f"{key.rstrip('/')}/" if key else ""
    under = [k for k in client.list_keys(prefix) if not k.endswith("/")]
    if under:
        for object_key in under:
            client.download(object_key, into / _relative(location, object_key, prefix))
        return None
    if not key or key.endswith("/"):
        raise FetchError(location.uri, f"no objects under {prefix!r} in bucket {client.bucket!r}")
    name = PurePosixPath(key).name
    client.download(key, into / name)
    return {"file": name}
