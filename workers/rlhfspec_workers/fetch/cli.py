"""``rlhfspec worker fetch [FILE] [--storage DIR]``: download every remote location of a job.

Where it sits: the first thing a worker pod runs, as its init container (the operator adds it
when the job names an ``hf://``, ``https://`` or ``s3://`` model or dataset, ``rlhfspec_operator.
fetch_init``); locally, run it before ``rlhfspec run`` with ``--storage`` set to the run
directory. It reads the job from ``FILE`` (default ``$RLHFSPEC_JOB_CONFIG``, the pod's
config mount) and writes into ``--storage`` (default ``$RLHFSPEC_STORAGE``, then the spec's
``storage.path``, then ``/data``). Each location is fetched once per storage (``store``); a
location already there is reused without a request. Exit 0 when every location is there, 1
when any is not: each failure is one line ``fetch failed: field: URI: what failed (HTTP
status)`` on stderr. The same lines, and one ``fetched: URI (downloaded N MiB in S s)`` per
location, go to the pod's termination message file, which the operator quotes in the job's
``ModelsReady`` condition (the log's tail stands in when the file is missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from rlhfspec_api.locations import locations
from rlhfspec_api.manifest import DocumentError, ManifestError, load_rlhfjob
from rlhfspec_api.models import FETCHED_ALLOWED, FETCHED_SCHEMES, UNSUPPORTED_SCHEMES
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.fetch.store import (
    MARKER,
    FetchError,
    RemoteLocation,
    dest_dir,
    install,
    parse_remote,
    resolved_path,
)

DEFAULT_STORAGE = "/data"
TERMINATION_LOG = Path("/dev/termination-log")
"""The pod's termination message file (its default path): the operator reads it back."""
TERMINATION_MESSAGE_BYTES = 4000
FETCHED_PREFIX = "fetched: "
FAILED_PREFIX = "fetch failed: "


def remote_locations(spec: RLHFJobSpec) -> Iterator[tuple[list[str], str]]:
    """(fields, URI) of every location the fetch step handles, each URI once (the policy and
    the reference often share one), in spec order."""
    fields: dict[str, list[str]] = {}
    for field, location in locations(spec):
        scheme, sep, _ = location.partition("://")
        if sep and scheme in FETCHED_SCHEMES + UNSUPPORTED_SCHEMES:
            fields.setdefault(location, []).append(field)
    for uri, names in fields.items():
        yield names, uri


def fetch_location(location: RemoteLocation, storage: Path) -> bool:
    """Download ``location`` into ``storage`` unless it is there; True when it downloaded."""
    if location.scheme == "hf":
        from rlhfspec_workers.fetch.hf import download_hf

        return install(location, storage, lambda into: download_hf(location, into))
    if location.scheme == "s3":
        from rlhfspec_workers.fetch.s3 import download_s3

        return install(location, storage, lambda into: download_s3(location, into))
    from rlhfspec_workers.fetch.https import download_https

    return install(location, storage, lambda into: download_https(location, into))


def _size(dest: Path) -> str:
    try:
        size = int(json.loads((dest / MARKER).read_text()).get("bytes", 0))
    except (OSError, ValueError, AttributeError):
        return "?"
    return f"{size / (1 << 20):.1f} MiB"


def fetch_all(spec: RLHFJobSpec, storage: Path) -> tuple[list[str], list[str]]:
    """Fetch every remote location of ``spec``: (one line per location fetched or reused,
    one line per failure, empty when every location is there)."""
    fetched: list[str] = []
    failures: list[str] = []
    for fields, uri in remote_locations(spec):
        named = ", ".join(fields)
        started = time.monotonic()
        try:
            scheme = uri.partition("://")[0]
            if scheme in UNSUPPORTED_SCHEMES:
                raise FetchError(uri, f"{scheme}:// is not supported ({FETCHED_ALLOWED})")
            location = parse_remote(uri)
            downloaded = fetch_location(location, storage)
        except FetchError as exc:
            failures.append(f"{named}: {exc.uri}: {exc.problem}")
            continue
        except OSError as exc:  # the storage itself: full, read-only, permissions
            failures.append(f"{named}: {uri}: writing into the job's storage {storage}: {exc}")
            continue
        seconds = time.monotonic() - started
        size = _size(dest_dir(location, storage))
        how = f"downloaded {size} in {seconds:.1f}s" if downloaded else f"reused, {size}"
        fetched.append(f"{uri} ({how})")
        print(f"[rlhfspec] fetch: {named}: {uri} -> {resolved_path(location, storage)} ({how})",
              flush=True)  # fmt: skip
    return fetched, failures


def write_termination_message(fetched: list[str], failures: list[str], path: Path) -> None:
    """The summary the operator quotes in ``ModelsReady``, into the pod's termination message
    file; only where the kubelet provides one (never created elsewhere, e.g. locally)."""
    if not path.is_file():
        return
    lines = [FETCHED_PREFIX + line for line in fetched] + [FAILED_PREFIX + f for f in failures]
    text = "\n".join(lines)
    # The kubelet keeps at most 4096 bytes; the failures (last) matter most, so keep the end.
    encoded = text.encode()[-TERMINATION_MESSAGE_BYTES:]
    with contextlib.suppress(OSError):
        path.write_bytes(encoded)


def _storage(flag: str | None, spec: RLHFJobSpec) -> Path:
    if flag:
        return Path(flag)
    if os.environ.get("RLHFSPEC_STORAGE"):
        return Path(os.environ["RLHFSPEC_STORAGE"])
    return Path(spec.storage.path or DEFAULT_STORAGE)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhfspec worker fetch", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "file", nargs="?", help="the RLHFJob manifest (default $RLHFSPEC_JOB_CONFIG)"
    )
    parser.add_argument("--storage", help="the job's storage root (default $RLHFSPEC_STORAGE)")
    args = parser.parse_args(argv)
    config = args.file or os.environ.get("RLHFSPEC_JOB_CONFIG")
    if not config:
        print("rlhfspec worker fetch: give FILE or set RLHFSPEC_JOB_CONFIG", file=sys.stderr)
        return 2
    try:
        job = load_rlhfjob(Path(config))
    except DocumentError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ManifestError as exc:
        for error in exc.errors:
            print(f"{config}: {error}", file=sys.stderr)
        return 1
    fetched, failures = fetch_all(job.spec, _storage(args.storage, job.spec))
    for line in failures:
        print(FAILED_PREFIX + line, file=sys.stderr, flush=True)
    write_termination_message(fetched, failures, TERMINATION_LOG)
    return 1 if failures else 0
