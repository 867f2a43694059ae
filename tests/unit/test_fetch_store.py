"""Where fetched locations live and how they get there (``rlhfspec_workers.fetch.store``), and
the https:// download against a local TLS server on 127.0.0.1 (a self-signed certificate the
client trusts through ``SSL_CERT_FILE``): a file, a model archive, a 404 and a hostile archive.
Concurrent fetchers of one URI download once; a failed download leaves nothing behind."""

from __future__ import annotations

import io
import os
import ssl
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rlhfspec_workers.fetch.cli import fetch_location
from rlhfspec_workers.fetch.store import (
    MARKER,
    FetchError,
    dest_dir,
    install,
    parse_remote,
    resolved_path,
)


def test_uris_map_to_readable_paths_keyed_by_repository_and_revision(tmp_path: Path) -> None:
    root = tmp_path / "fetched"
    policy = parse_remote("hf://org/policy")
    assert (policy.repo_id, policy.repo_type, policy.revision) == ("org/policy", "model", "main")
    assert dest_dir(policy, tmp_path) == root / "hf" / "org--policy@main"
    pinned = parse_remote("hf://org/policy@v1.2")
    assert dest_dir(pinned, tmp_path) == root / "hf" / "org--policy@v1.2"
    data = parse_remote("hf://datasets/org/sort@abc123/data/train.jsonl")
    assert (data.repo_type, data.revision, data.sub_path) == (
        "dataset",
        "abc123",
        "data/train.jsonl",
    )
    dest = dest_dir(data, tmp_path)
    assert dest.parent == root / "hf" and dest.name.startswith("datasets--org--sort@abc123+")
    assert resolved_path(data, tmp_path) == dest / "data" / "train.jsonl"
    # Two URLs differing only in their query are two downloads.
    first = dest_dir(parse_remote("https://h.example/m.tar.gz?v=1"), tmp_path)
    second = dest_dir(parse_remote("https://h.example/m.tar.gz?v=2"), tmp_path)
    assert first.parent == second.parent == root / "https" / "h.example" and first != second
    bucket_object = dest_dir(parse_remote("s3://models/tiny/policy"), tmp_path)
    assert bucket_object.parent == root / "s3" / "models"
    assert bucket_object.name.startswith("tiny--policy+")
    for bad in ("hf://gpt2", "hf://org/x/../y", "gs://bucket/x", "s3:///x", "https:///nohost"):
        with pytest.raises(FetchError):
            parse_remote(bad)


def test_concurrent_fetchers_download_once_and_all_find_the_copy(tmp_path: Path) -> None:
    location = parse_remote("hf://org/policy")
    calls: list[int] = []

    def slow_download(into: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        (into / "config.json").write_text("{}")

    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(install(location, tmp_path, slow_download)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and sorted(results) == [False, False, True]
    dest = dest_dir(location, tmp_path)
    assert (dest / "config.json").read_text() == "{}" and (dest / MARKER).is_file()
    assert [p.name for p in dest.parent.iterdir() if ".partial-" in p.name] == []


def test_a_copy_renamed_in_by_another_node_wins_and_a_failure_leaves_nothing(
    tmp_path: Path,
) -> None:
    location = parse_remote("hf://org/policy")
    dest = dest_dir(location, tmp_path)

    def raced(into: Path) -> None:
        # Another node (whose lock this one cannot see) finished first while this downloaded.
        (into / "config.json").write_text("mine")
        dest.mkdir()
        (dest / "config.json").write_text("theirs")
        (dest / MARKER).write_text("{}")

    assert install(location, tmp_path, raced) is False
    assert (dest / "config.json").read_text() == "theirs"

    other = parse_remote("hf://org/other")

    def failing(into: Path) -> None:
        (into / "half.bin").write_bytes(b"x")
        raise FetchError(other.uri, "download from the hub failed: HTTP 500", 500)

    with pytest.raises(FetchError):
        install(other, tmp_path, failing)
    parent = dest_dir(other, tmp_path).parent
    assert not dest_dir(other, tmp_path).exists()
    assert [p.name for p in parent.iterdir() if ".partial-" in p.name] == []


def test_partials_left_by_dead_fetchers_are_removed_after_a_day(tmp_path: Path) -> None:
    location = parse_remote("hf://org/policy")
    dest = dest_dir(location, tmp_path)
    dest.parent.mkdir(parents=True)
    old, fresh = (dest.with_name(f".{dest.name}.partial-{n}") for n in ("old", "fresh"))
    for partial in (old, fresh):
        partial.mkdir()
        (partial / "half.bin").write_bytes(b"x")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))

    def download(into: Path) -> None:
        (into / "config.json").write_text("{}")

    install(location, tmp_path, download)
    assert not old.exists()
    assert (fresh / "half.bin").is_file()  # another node's fetcher may still be writing it
    assert (dest / "config.json").is_file()


# --- https:// against a local TLS server -----------------------------------------------------


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MODEL = {"model/config.json": b'{"vocab_size": 64}', "model/tokenizer.json": b"{}"}
ROUTES = {
    "/data/train.jsonl": b'{"prompt": "S21=", "answer": "12"}\n',
    "/models/tiny.tar.gz": _tar_gz(MODEL),
    "/models/evil.tar.gz": _tar_gz({"../../escape.txt": b"x"}),
}


@pytest.fixture
def https_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = ROUTES.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts this server only
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_https_file_and_model_archive_are_fetched(https_server: str, tmp_path: Path) -> None:
    data = parse_remote(f"{https_server}/data/train.jsonl")
    assert fetch_location(data, tmp_path) is True
    assert resolved_path(data, tmp_path).read_bytes() == ROUTES["/data/train.jsonl"]
    assert fetch_location(data, tmp_path) is False  # reused

    model = parse_remote(f"{https_server}/models/tiny.tar.gz")
    assert fetch_location(model, tmp_path) is True
    model_dir = resolved_path(model, tmp_path)
    assert model_dir == dest_dir(model, tmp_path) / "model"  # the archive's one top folder
    assert (model_dir / "config.json").read_bytes() == MODEL["model/config.json"]
    assert not (dest_dir(model, tmp_path) / "tiny.tar.gz").exists()


def test_https_refusals_name_the_uri_and_status(https_server: str, tmp_path: Path) -> None:
    missing = parse_remote(f"{https_server}/models/none.tar.gz")
    with pytest.raises(FetchError) as info:
        fetch_location(missing, tmp_path)
    assert info.value.status == 404
    assert str(info.value) == f"{missing.uri}: download failed: HTTP 404 Not Found"
    evil = parse_remote(f"{https_server}/models/evil.tar.gz")
    with pytest.raises(FetchError) as refused:
        fetch_location(evil, tmp_path)
    assert "refused archive: member '../../escape.txt' would land outside" in str(refused.value)
    assert not (tmp_path / "escape.txt").exists() and not dest_dir(evil, tmp_path).exists()
