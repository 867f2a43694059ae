"""Download an ``https://`` file, unpacking it when it is an archive of a model directory.

Where it sits: called by ``fetch.cli`` through ``store.install``, which hands it a fresh
directory and renames that into place afterwards. The body is streamed to a temporary name
beside its final one (never held in memory), its length checked against Content-Length, and
renamed; a ``.tar``, ``.tar.gz``, ``.tgz`` or ``.zip`` is then unpacked and deleted. Archive
members that would land outside the directory (absolute paths, ``..``, links) are refused.
The URL is the cache key: there is no revision, so pin one in the URL when the file changes.
"""

from __future__ import annotations

import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from rlhfspec_workers.fetch.store import FetchError, RemoteLocation

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0


def _fetch_file(location: RemoteLocation, target: Path) -> None:
    partial = target.with_name(f".{target.name}.part")
    request = urllib.request.Request(location.uri, headers={"User-Agent": "rlhfspec-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            expected = response.headers.get("Content-Length")
            with partial.open("wb") as out:
                shutil.copyfileobj(response, out, CHUNK_BYTES)
    except urllib.error.HTTPError as exc:
        raise FetchError(
            location.uri, f"download failed: HTTP {exc.code} {exc.reason}", exc.code
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(location.uri, f"download failed: no HTTP response ({reason})") from None
    size = partial.stat().st_size
    if expected is not None and expected.isdigit() and int(expected) != size:
        raise FetchError(location.uri, f"download cut short: {size} of {expected} bytes")
    partial.rename(target)


def _member_problem(name: str) -> str | None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        return f"member {name!r} would land outside the model directory"
    return None


def _unpack(location: RemoteLocation, archive: Path, into: Path) -> None:
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                for name in zipped.namelist():
                    problem = _member_problem(name)
                    if problem is not None:
                        raise FetchError(location.uri, f"refused archive: {problem}")
                zipped.extractall(into)
        else:
            with tarfile.open(archive) as tarred:
                for member in tarred.getmembers():
                    problem = _member_problem(member.name)
                    if problem is None and not (member.isfile() or member.isdir()):
                        problem = f"member {member.name!r} is a link or device, not a file"
                    if problem is not None:
                        raise FetchError(location.uri, f"refused archive: {problem}")
                tarred.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise FetchError(location.uri, f"not a readable archive: {exc}") from None
    archive.unlink()


def download_https(location: RemoteLocation, into: Path) -> None:
    """Download ``location`` into the empty directory ``into`` (unpacked if an archive);
    FetchError naming the URI and the HTTP status on failure."""
    target = into / location.file_name
    _fetch_file(location, target)
    if location.is_archive:
        _unpack(location, target, into)
