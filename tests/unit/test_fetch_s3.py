"""``s3://`` fetching (``rlhfspec_workers.fetch.s3``): the SigV4 signer reproduces the signature
of the GET Object example published with the S3 API, and a local S3-compatible stand-in on
127.0.0.1 (path-style, ListObjectsV2 paged two keys at a time, GetObject, refusing a request
whose signature it cannot reproduce with the secret it holds) serves a model directory and a
single dataset object; a wrong key and a missing object are named with URI and HTTP status."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

import pytest

from rlhfspec_workers.fetch.cli import fetch_location
from rlhfspec_workers.fetch.s3 import Keys, sign
from rlhfspec_workers.fetch.store import FetchError, dest_dir, parse_remote, resolved_path

KEY_ID = "AKIDEXAMPLE0123"
SECRET = "local-test-secret-0123456789"
REGION = "us-east-1"


def test_signer_reproduces_the_published_get_object_example() -> None:
    headers = sign(
        "GET",
        "https://examplebucket.s3.amazonaws.com/test.txt",
        {"Range": "bytes=0-9"},
        Keys("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        "us-east-1",
        datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC),
    )
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


OBJECTS = {
    "models": {
        "tiny/policy/config.json": b'{"vocab_size": 64}',
        "tiny/policy/tokenizer.json": b"{}",
        "tiny/policy/sub/weights.bin": b"\x00" * 1000,
        "tiny/policy-other/config.json": b"{}",  # shares the prefix text, not the folder
    },
    "data": {"sort/train.jsonl": b'{"prompt": "S21=", "answer": "12"}\n'},
    "evil": {"m/config.json": b"{}", "m/../../escape.txt": b"x"},
}
PAGE = 2


class Store:
    def __init__(self) -> None:
        self.requests: list[str] = []
        self.url = ""


def _handler(store: Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authentic(self) -> bool:
            stamp = self.headers.get("x-amz-date", "")
            try:
                when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ")
            except ValueError:
                return False
            expected = sign(
                "GET",
                f"http://{self.headers['Host']}{self.path}",
                {"User-Agent": self.headers.get("User-Agent", "")},
                Keys(KEY_ID, SECRET),
                REGION,
                when.replace(tzinfo=datetime.UTC),
            )
            return self.headers.get("Authorization") == expected["Authorization"]

        def do_GET(self) -> None:
            store.requests.append(self.path)
            if not self._authentic():
                self._reply(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
                return
            parts = urlsplit(self.path)
            bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
            objects = OBJECTS.get(bucket)
            if objects is None:
                self._reply(404, b"<Error><Code>NoSuchBucket</Code></Error>")
                return
            query = parse_qs(parts.query)
            if query.get("list-type") == ["2"]:
                prefix = query.get("prefix", [""])[0]
                keys = sorted(k for k in objects if k.startswith(prefix))
                start = int(query.get("continuation-token", ["0"])[0])
                page = keys[start : start + PAGE]
                more = start + PAGE < len(keys)
                body = (
                    '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    + "".join(f"<Contents><Key>{escape(k)}</Key></Contents>" for k in page)
                    + f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>"
                    + (f"<NextContinuationToken>{start + PAGE}</NextContinuationToken>" if more
                       else "")
                    + "</ListBucketResult>"
                )  # fmt: skip
                self._reply(200, body.encode())
            elif key in objects:
                self._reply(200, objects[key])
            else:
                self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>")

    return Handler


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    store = Store()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(store))
    store.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.url)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    yield store
    server.shutdown()
    server.server_close()


def test_a_model_folder_and_a_dataset_object_are_fetched_signed(s3: Store, tmp_path: Path) -> None:
    model = parse_remote("s3://models/tiny/policy")
    assert fetch_location(model, tmp_path) is True
    model_dir = resolved_path(model, tmp_path)
    assert model_dir == dest_dir(model, tmp_path)
    fetched = {str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()}
    assert fetched == {"config.json", "tokenizer.json", "sub/weights.bin", ".rlhfspec-fetch.json"}
    assert (model_dir / "sub" / "weights.bin").read_bytes() == b"\x00" * 1000
    listings = [r for r in s3.requests if "list-type=2" in r]
    assert len(listings) == 2  # three keys under tiny/policy/, two per page

    data = parse_remote("s3://data/sort/train.jsonl")
    assert fetch_location(data, tmp_path) is True
    assert resolved_path(data, tmp_path) == dest_dir(data, tmp_path) / "train.jsonl"
    assert resolved_path(data, tmp_path).read_bytes() == OBJECTS["data"]["sort/train.jsonl"]

    before = len(s3.requests)
    assert fetch_location(model, tmp_path) is False
    assert s3.requests[before:] == []


def test_a_wrong_key_and_a_missing_object_name_the_uri_and_status(
    s3: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = parse_remote("s3://data/sort/none.jsonl")
    with pytest.raises(FetchError) as info:
        fetch_location(missing, tmp_path)
    assert info.value.status == 404
    assert str(info.value).startswith("s3://data/sort/none.jsonl: downloading sort/none.jsonl "
                                      "failed: HTTP 404")  # fmt: skip
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(FetchError) as refused:
        fetch_location(parse_remote("s3://models/tiny/policy"), tmp_path)
    assert refused.value.status == 403
    assert "listing the bucket failed: HTTP 403" in str(refused.value)
    assert "spec.credentials.s3" in str(refused.value)


def test_an_object_key_leading_out_of_the_directory_is_refused(s3: Store, tmp_path: Path) -> None:
    evil = parse_remote("s3://evil/m")
    with pytest.raises(FetchError) as info:
        fetch_location(evil, tmp_path)
    assert str(info.value) == (
        "s3://evil/m: object key 'm/../../escape.txt' would land outside the directory"
    )
    assert not any(p.name == "escape.txt" for p in tmp_path.rglob("*"))
    assert not dest_dir(evil, tmp_path).exists()
