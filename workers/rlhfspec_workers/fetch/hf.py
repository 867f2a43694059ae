"""Download an ``hf://`` repository (or one path inside it) with ``huggingface_hub``.

Where it sits: called by ``fetch.cli`` through ``store.install``, which hands it a fresh
directory and renames that into place afterwards. The hub's own client does the work
(``snapshot_download`` into that directory): it honours ``HF_ENDPOINT`` (a mirror, or the test
suite's local hub) and is given ``HF_TOKEN`` explicitly, which the init container takes from
the Secret ``spec.credentials.hfToken`` names; a token file in the home directory is never
used, so a job only ever sees the credential its spec names.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from rlhfspec_workers.fetch.store import FetchError, RemoteLocation

HUB_CACHE_DIR = ".cache"
"""The hub client's bookkeeping inside a ``local_dir`` download; removed once done."""


def _status(exc: BaseException | None) -> int | None:
    """The HTTP status behind ``exc``, also when the client wrapped the HTTP error in another
    (it reports a hub that answered 5xx as "no local copy", caused by the HTTP error)."""
    while exc is not None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        exc = exc.__cause__
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def download_hf(
    location: RemoteLocation, into: Path, environ: Mapping[str, str] | None = None
) -> None:
    """Download ``location`` into the empty directory ``into``; FetchError naming the URI and
    the HTTP status when the hub refuses or the connection fails."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils.tqdm import disable_progress_bars

    env = os.environ if environ is None else environ
    # Progress bars would fill the log whose tail is the init container's termination message.
    disable_progress_bars()
    patterns = None
    if location.sub_path:
        patterns = [location.sub_path, f"{location.sub_path}/*"]
    try:
        snapshot_download(
            repo_id=location.repo_id,
            repo_type=location.repo_type,
            revision=location.revision,
            local_dir=into,
            # Its bookkeeping (refs, locks) stays inside the download and is removed with it.
            cache_dir=into / HUB_CACHE_DIR / "hub",
            allow_patterns=patterns,
            token=env.get("HF_TOKEN") or False,
            endpoint=env.get("HF_ENDPOINT") or None,
            max_workers=4,
        )
    except Exception as exc:  # the hub client raises many types; each becomes one line
        status = _status(exc)
        what = f"HTTP {status}" if status is not None else type(exc).__name__
        hint = ""
        if status in (401, 403):
            hint = " (a gated or private repository needs spec.credentials.hfToken)"
        raise FetchError(
            location.uri,
            f"download from the hub failed: {what}: {_first_line(exc)}{hint}",
            status,
        ) from exc
    shutil.rmtree(into / HUB_CACHE_DIR, ignore_errors=True)
    if location.sub_path and not (into / location.sub_path).exists():
        raise FetchError(
            location.uri,
            f"revision {location.revision} of {location.repo_id} has no {location.sub_path!r}",
        )
