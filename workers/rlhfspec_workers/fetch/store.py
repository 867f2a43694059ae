"""Where a fetched location lives in the job's storage, and how it gets there atomically.

Where it sits: the fetch step (``fetch.cli``) downloads each remote location into the
directory :func:`dest_dir` names, through :func:`install`; worker preflight
(``preflight.resolve_location``) maps the same URI onto :func:`resolved_path` and reads it.
Both sides compute the path from the URI alone, so nothing else records where a download went.

Layout under the storage root (``/data`` on a pod)::

    fetched/hf/ORG--NAME@REVISION[+PATHHASH]/     an hf:// repository (or the PATH inside it)
    fetched/hf/datasets--ORG--NAME@REVISION/      an hf://datasets/... repository
    fetched/https/HOST/URLHASH/                   an https:// file or unpacked archive
    fetched/s3/BUCKET/KEY+KEYHASH/                an s3:// object or the objects under KEY/

A directory at one of these names is complete: downloads are written to a hidden sibling
``.NAME.partial-*`` and renamed into place only once every file is there (with
:data:`MARKER` inside), so a reader never sees half a download. Several pods fetching the
same URI serialise on a lock file beside it; where the shared filesystem does not honour
locks, each downloads on its own, the first rename wins and the others reuse its copy. A
partial left by a fetcher that died (its pod deleted mid-download) is removed by the next
fetch of the same URI once it is a day old.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from rlhfspec_api.models import FETCHED_ALLOWED, FETCHED_SCHEMES, hf_repo_problem

FETCHED_DIR = "fetched"
MARKER = ".rlhfspec-fetch.json"
"""Written inside a download before it is renamed into place: what was fetched, and when."""
DEFAULT_REVISION = "main"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
STALE_PARTIAL_SECONDS = 24 * 3600
"""A partial download untouched this long was left by a fetcher that died (a deleted pod)."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class FetchError(Exception):
    """A location that could not be fetched; ``status`` is the HTTP status when one came back."""

    def __init__(self, uri: str, problem: str, status: int | None = None) -> None:
        super().__init__(f"{uri}: {problem}")
        self.uri = uri
        self.problem = problem
        self.status = status


@dataclass(frozen=True)
class RemoteLocation:
    """A parsed ``hf://``, ``https://`` or ``s3://`` location."""

    uri: str
    scheme: str
    repo_id: str = ""
    """hf: ``ORG/NAME``; s3: the bucket."""
    repo_type: str = "model"
    """hf: ``model`` or ``dataset``."""
    revision: str = DEFAULT_REVISION
    """hf: branch, tag or commit (``main`` when the URI names none)."""
    sub_path: str = ""
    """hf: a file or folder inside the repository (only it is downloaded), empty for all;
    s3: the object key (or the prefix of a directory's objects)."""

    @property
    def is_archive(self) -> bool:
        """https: the URL names an archive, unpacked into the download directory."""
        return self.scheme == "https" and urlsplit(self.uri).path.lower().endswith(ARCHIVE_SUFFIXES)

    @property
    def file_name(self) -> str:
        """https: the file's name in the download directory (the URL path's last segment)."""
        name = PurePosixPath(urlsplit(self.uri).path).name
        return _UNSAFE.sub("_", name) or "download"


def is_remote(location: str) -> bool:
    """Whether the fetch step downloads ``location`` (its scheme is hf, https or s3)."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme in FETCHED_SCHEMES


def parse_remote(uri: str) -> RemoteLocation:
    """``hf://[datasets/]ORG/NAME[@REV][/PATH]``, ``https://HOST/PATH`` or
    ``s3://BUCKET/KEY``; FetchError for anything else."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in FETCHED_SCHEMES:
        raise FetchError(uri, f"the fetch step does not download {scheme or 'plain'} locations "
                         f"({FETCHED_ALLOWED})")  # fmt: skip
    if scheme == "https":
        if not urlsplit(uri).hostname:
            raise FetchError(uri, f"names no host ({FETCHED_ALLOWED})")
        return RemoteLocation(uri=uri, scheme=scheme)
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket or ".." in PurePosixPath(key).parts:
            raise FetchError(uri, f"names no bucket, or has '..' in its key ({FETCHED_ALLOWED})")
        return RemoteLocation(uri=uri, scheme=scheme, repo_id=bucket, sub_path=key)
    problem = hf_repo_problem(rest)
    if problem is not None:
        raise FetchError(uri, f"{problem} ({FETCHED_ALLOWED})")
    parts = rest.split("/")
    repo_type = "model"
    if parts[0] == "datasets":
        repo_type, parts = "dataset", parts[1:]
    name, _, revision = parts[1].partition("@")
    return RemoteLocation(
        uri=uri,
        scheme=scheme,
        repo_id=f"{parts[0]}/{name}",
        repo_type=repo_type,
        revision=revision or DEFAULT_REVISION,
        sub_path="/".join(parts[2:]),
    )


def _short_hash(text: str, chars: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def dest_dir(location: RemoteLocation, storage_root: Path) -> Path:
    """The download directory of ``location`` in the storage at ``storage_root``."""
    root = storage_root / FETCHED_DIR / location.scheme
    if location.scheme == "https":
        host = _UNSAFE.sub("_", urlsplit(location.uri).hostname or "host")
        return root / host / _short_hash(location.uri, 16)
    if location.scheme == "s3":
        key = location.sub_path.strip("/")
        name = _UNSAFE.sub("_", key.replace("/", "--"))[:80] or "bucket"
        return root / _UNSAFE.sub("_", location.repo_id) / f"{name}+{_short_hash(key, 12)}"
    prefix = "datasets--" if location.repo_type == "dataset" else ""
    name = prefix + location.repo_id.replace("/", "--")
    key = f"{_UNSAFE.sub('_', name)}@{_UNSAFE.sub('_', location.revision)}"
    if location.sub_path:
        key += f"+{_short_hash(location.sub_path, 12)}"
    return root / key


def resolved_path(location: RemoteLocation, storage_root: Path) -> Path:
    """What the job reads once ``location`` is fetched: the model directory or dataset file."""
    dest = dest_dir(location, storage_root)
    if location.scheme == "hf":
        return dest / location.sub_path if location.sub_path else dest
    if location.scheme == "s3":
        # One object is the file its download record names; a key prefix is the directory.
        try:
            record = json.loads((dest / MARKER).read_text())
        except (OSError, ValueError):
            return dest
        single = record.get("file") if isinstance(record, dict) else None
        return dest / single if isinstance(single, str) and single else dest
    if not location.is_archive:
        return dest / location.file_name
    # An archive of one top-level folder (``model/config.json``) is that folder.
    entries = [p for p in dest.iterdir() if p.name != MARKER] if dest.is_dir() else []
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def is_complete(dest: Path) -> bool:
    return (dest / MARKER).is_file()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock: a second fetcher of the same URI waits, then reuses."""
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_partials(dest: Path) -> None:
    """Delete partial downloads of ``dest`` that no live fetcher can still be writing: on this
    node the lock says none is; on another, one would have touched it within the last day."""
    cutoff = time.time() - STALE_PARTIAL_SECONDS
    for partial in dest.parent.glob(f".{dest.name}.partial-*"):
        with contextlib.suppress(OSError):
            if partial.stat().st_mtime < cutoff:
                shutil.rmtree(partial, ignore_errors=True)


def install(
    location: RemoteLocation,
    storage_root: Path,
    download: Callable[[Path], Mapping[str, str] | None],
) -> bool:
    """Make ``dest_dir(location)`` complete: reuse it when it is, else ``download(into)`` into
    a fresh hidden directory and rename that into place (what ``download`` returns joins the
    download record). True when this call downloaded."""
    dest = dest_dir(location, storage_root)
    if is_complete(dest):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest.with_name(f".{dest.name}.lock")):
        if is_complete(dest):  # another fetcher finished while this one waited
            return False
        _remove_stale_partials(dest)
        partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            extra = download(partial)
            files = [p for p in partial.rglob("*") if p.is_file()]
            record = {
                "uri": location.uri,
                "revision": location.revision if location.scheme == "hf" else None,
                "files": len(files),
                "bytes": sum(p.stat().st_size for p in files),
                "fetchedAt": datetime.now(UTC).isoformat(timespec="seconds"),
                **(extra or {}),
            }
            (partial / MARKER).write_text(json.dumps(record, indent=2) + "\n")
            try:
                os.rename(partial, dest)
            except OSError:
                # Another node's fetcher (no shared lock) renamed its copy first: reuse it.
                if not is_complete(dest):
                    raise
                return False
            return True
        finally:
            shutil.rmtree(partial, ignore_errors=True)


__all__ = [
    "FETCHED_DIR",
    "MARKER",
    "FetchError",
    "RemoteLocation",
    "dest_dir",
    "install",
    "is_complete",
    "is_remote",
    "parse_remote",
    "resolved_path",
]
