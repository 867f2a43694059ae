"""The fetch step against a local stand-in for the Hugging Face hub: the real ``huggingface_hub``
download code (``HF_ENDPOINT`` pointing at 127.0.0.1) fetches the tiny kit's policy and dataset
through ``rlhfspec worker fetch``, worker preflight then resolves the hf:// URIs to the copies
in the job's storage, a second fetch makes no request, and refusals name the field, the URI and
the HTTP status. The server implements the few hub endpoints ``snapshot_download`` calls: repo
info (``/api/{models,datasets}/REPO/revision/REV``), the recursive tree listing and
``/[datasets/]REPO/resolve/REV/FILE`` (HEAD and GET, with ``X-Repo-Commit`` and ``ETag``)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from rlhfspec_api.manifest import load_rlhfjob
from rlhfspec_workers.fetch.store import MARKER
from rlhfspec_workers.preflight import preflight

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_test_token_0123456789"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    files: dict[str, bytes]
    private: bool = False
    """Answer 401 unless the request carries ``Authorization: Bearer TOKEN``."""
    down: bool = False
    """Answer 503 to everything (the hub is down)."""


@dataclass
class Hub:
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    """(models|datasets, ORG/NAME) -> repository at revision ``main`` (commit COMMIT)."""
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    """(method, path, Authorization header) of every request, in order."""
    url: str = ""

    def file_requests(self) -> list[str]:
        return [path for _, path, _ in self.requests if "/resolve/" in path]


def _route(path: str) -> tuple[str, str, str, str] | None:
    """(kind, repo, what, rest): what is 'info', 'tree' or 'resolve'."""
    parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
    if parts[:1] == ["api"] and len(parts) >= 6 and parts[1] in ("models", "datasets"):
        kind, repo, what = parts[1], "/".join(parts[2:4]), parts[4]
        return kind, repo, {"revision": "info", "tree": "tree"}.get(what, what), ""
    kind = "models"
    if parts[:1] == ["datasets"]:
        kind, parts = "datasets", parts[1:]
    if len(parts) >= 5 and parts[2] == "resolve":
        return kind, "/".join(parts[:2]), "resolve", "/".join(parts[4:])
    return None


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
            self.send_response(code)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            auth = self.headers.get("Authorization", "")
            hub.requests.append((self.command, self.path, auth))
            route = _route(self.path)
            repo = hub.repos.get(route[:2]) if route else None
            if route is None or repo is None:
                error = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
                self._send(404, b'{"error": "Repository not found"}', error, head)
                return
            if repo.down:
                self._send(503, b'{"error": "Service Unavailable"}', {}, head)
                return
            if repo.private and auth != f"Bearer {TOKEN}":
                self._send(401, b'{"error": "Invalid credentials"}', {}, head)
                return
            _, name, what, rest = route
            json_type = {"Content-Type": "application/json"}
            if what == "info":
                siblings = [{"rfilename": f} for f in sorted(repo.files)]
                body = {"id": name, "sha": COMMIT, "siblings": siblings, "private": repo.private}
                self._send(200, json.dumps(body).encode(), json_type, head)
            elif what == "tree":
                tree = [
                    {"type": "file", "path": f, "size": len(data), "oid": _oid(data)}
                    for f, data in sorted(repo.files.items())
                ]
                self._send(200, json.dumps(tree).encode(), json_type, head)
            elif what == "resolve" and rest in repo.files:
                data = repo.files[rest]
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_oid(data)}"'}
                self._send(200, data, headers, head)
            else:
                self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"},
                           head)  # fmt: skip

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

    return Handler


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


@pytest.fixture
def hub(tiny_kit: Path) -> Iterator[Hub]:
    state = Hub()
    state.repos[("models", "org/tiny-policy")] = Repo(_files(tiny_kit / "policy"))
    state.repos[("models", "org/private-policy")] = Repo(_files(tiny_kit / "policy"), private=True)
    state.repos[("models", "org/down-policy")] = Repo({}, down=True)
    state.repos[("datasets", "org/tiny-sort")] = Repo(
        {"train.jsonl": (tiny_kit / "dataset" / "train.jsonl").read_bytes(), "big.bin": b"x" * 64}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _job(
    tmp_path: Path, policy: str, dataset: str = "hf://datasets/org/tiny-sort/train.jsonl"
) -> Path:
    manifest = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    manifest["spec"]["models"]["policy"]["path"] = policy
    manifest["spec"]["models"]["reference"] = {"path": policy}
    manifest["spec"]["dataset"]["path"] = dataset
    manifest["spec"]["generation"]["speculative"] = {"mode": "off"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _fetch(
    hub: Hub, job: Path, storage: Path, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(storage.parent / "hf-home"))
    if token is not None:
        env["HF_TOKEN"] = token
    rlhfspec = Path(sys.executable).parent / "rlhfspec"
    command = [str(rlhfspec), "worker", "fetch", str(job), "--storage", str(storage)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_fetch_downloads_the_tiny_policy_and_dataset_and_a_second_fetch_reuses(
    hub: Hub, tiny_kit: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    job = _job(tmp_path, "hf://org/tiny-policy")
    first = _fetch(hub, job, storage)
    assert first.returncode == 0, first.stderr
    # The policy and the reference share a URI: one download, both fields named.
    assert (
        "spec.models.policy.path, spec.models.reference.path: hf://org/tiny-policy" in first.stdout
    )
    policy_dir = storage / "fetched" / "hf" / "org--tiny-policy@main"
    assert _files(policy_dir) == _files(tiny_kit / "policy")
    assert not (policy_dir / ".cache").exists()
    # Only the dataset file the URI names was downloaded, not the rest of its repository.
    assert not any("big.bin" in p for p in hub.file_requests())
    assert any(p.startswith("/datasets/org/tiny-sort/resolve/") for p in hub.file_requests())

    spec = load_rlhfjob(job).spec
    resolved = preflight(spec, storage_root=storage, cluster=True)
    assert resolved.models["spec.models.policy"] == policy_dir
    assert resolved.models["spec.models.reference"] == policy_dir
    assert resolved.dataset.read_bytes() == (tiny_kit / "dataset" / "train.jsonl").read_bytes()

    before = len(hub.requests)
    second = _fetch(hub, job, storage)
    assert second.returncode == 0, second.stderr
    assert "(reused, " in second.stdout and "(downloaded" not in second.stdout
    assert hub.requests[before:] == []  # a finished download is reused without any request


def test_a_missing_repository_names_the_field_uri_and_status(hub: Hub, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    result = _fetch(hub, _job(tmp_path, "hf://org/missing"), storage)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "fetch failed: spec.models.policy.path, spec.models.reference.path: hf://org/missing: "
        "download from the hub failed: HTTP 404"
    ), result.stderr
    # Nothing half-done is left where preflight looks.
    assert not (storage / "fetched" / "hf" / "org--missing@main").exists()
    assert list((storage / "fetched" / "hf").glob(".org--missing@main.partial-*")) == []


def test_a_private_repository_needs_the_token_which_reaches_the_hub(
    hub: Hub, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    job = _job(tmp_path, "hf://org/private-policy")
    refused = _fetch(hub, job, storage)
    assert refused.returncode == 1
    assert "hf://org/private-policy: download from the hub failed: HTTP 401" in refused.stderr
    assert "spec.credentials.hfToken" in refused.stderr
    assert all(auth == "" for _, _, auth in hub.requests)

    hub.requests.clear()
    allowed = _fetch(hub, job, storage, token=TOKEN)
    assert allowed.returncode == 0, allowed.stderr
    private = [(path, auth) for _, path, auth in hub.requests if "private-policy" in path]
    assert private and all(auth == f"Bearer {TOKEN}" for _, auth in private)
    assert (storage / "fetched" / "hf" / "org--private-policy@main" / "config.json").is_file()


def test_pods_fetching_at_once_download_each_file_once(hub: Hub, tmp_path: Path) -> None:
    """Four pods of a job start together on a fresh claim: four real fetch processes, one
    download of each file, every one of them finds the complete copy."""
    storage = tmp_path / "storage"
    job = _job(tmp_path, "hf://org/tiny-policy")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
    rlhfspec = Path(sys.executable).parent / "rlhfspec"
    command = [str(rlhfspec), "worker", "fetch", str(job), "--storage", str(storage)]
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], outputs
    gets = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert len(gets) == len(set(gets)) == len(hub.repos[("models", "org/tiny-policy")].files) + 1
    downloaded = sum(out.count("(downloaded ") for out, _ in outputs)
    assert downloaded == 2  # the policy once and the dataset once, by whichever pod came first
    assert list((storage / "fetched" / "hf").glob(".*.partial-*")) == []


def test_a_hub_that_is_down_is_named_with_its_status(hub: Hub, tmp_path: Path) -> None:
    """The hub client reports a 5xx as "no local copy" caused by the HTTP error; the fetch
    still names the status it got."""
    result = _fetch(hub, _job(tmp_path, "hf://org/down-policy"), tmp_path / "storage")
    assert result.returncode == 1
    assert "hf://org/down-policy: download from the hub failed: HTTP 503" in result.stderr


def test_the_termination_message_summarises_what_was_fetched_and_what_failed(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod the kubelet provides the termination message file; the fetch writes its summary
    there (the operator quotes it in ModelsReady), and never creates such a file elsewhere."""
    from rlhfspec_workers.fetch import cli

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    message = tmp_path / "termination-log"
    message.touch()
    monkeypatch.setattr(cli, "TERMINATION_LOG", message)
    storage = tmp_path / "storage"
    assert cli.main([str(_job(tmp_path, "hf://org/tiny-policy")), "--storage", str(storage)]) == 0
    lines = message.read_text().splitlines()
    assert lines[0].startswith("fetched: hf://org/tiny-policy (downloaded ")
    assert lines[0].endswith("s)") and " MiB in " in lines[0]
    assert lines[1].startswith("fetched: hf://datasets/org/tiny-sort/train.jsonl (downloaded ")

    assert cli.main([str(_job(tmp_path, "hf://org/missing")), "--storage", str(storage)]) == 1
    lines = message.read_text().splitlines()
    assert lines[0].startswith("fetched: hf://datasets/org/tiny-sort/train.jsonl (reused, ")
    assert lines[1].startswith(
        "fetch failed: spec.models.policy.path, spec.models.reference.path: hf://org/missing: "
        "download from the hub failed: HTTP 404"
    )

    absent = tmp_path / "no-such-file"
    monkeypatch.setattr(cli, "TERMINATION_LOG", absent)
    assert cli.main([str(_job(tmp_path, "hf://org/tiny-policy")), "--storage", str(storage)]) == 0
    assert not absent.exists()
