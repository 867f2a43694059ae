"""``rlhfspec run --resume``: which manifest changes a resumed run accepts, and which it refuses.

Where it sits: ``local.run.main`` calls :func:`resume_changes` before it touches the run
directory. The run directory's ``job.yaml`` is the manifest the job's checkpoints, Redis state
and sample ids were made with. A resumed run continues that job, so a change that alters what
the job trains on or how (models, dataset, reward, sampling, algorithm, seed, the job's name
that namespaces its Redis keys) is refused with every changed field and its old and new value:
resuming would silently mix two jobs. Fields that only change how fast or how long the job
runs may change (:data:`RESUMABLE_FIELDS`); they are listed when they do.

Workers run in sessions of their own (the terminal's Ctrl-C reaches only the supervisor), so a
killed ``rlhfspec run`` can leave its workers, and a crash its redis-server, running.
:func:`previous_run_processes` finds them, and ``main`` refuses to start a run (fresh or
resumed) in a run directory whose earlier processes still run: a second set of workers would
train the same samples against the same checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

RESUMABLE_FIELDS = (
    "spec.algorithm.iterations",
    "spec.activeDeadlineSeconds",
    "spec.backoffLimit",
    "spec.startupDeadlineSeconds",
    "spec.suspend",
    "spec.ttlDeletesJob",
    "spec.image",
    "spec.generation.replicas",
    "spec.generation.resources",
    "spec.generation.gpuMemoryUtilization",
    "spec.generation.speculative",
    "spec.generation.reallocation",
    "spec.inference.resources",
    "spec.inference.batchSize",
    "spec.trainer.resources",
    "spec.trainer.checkpointEvery",
    "spec.trainer.keepCheckpoints",
    "metadata.labels",
    "metadata.annotations",
)
"""Dotted manifest paths (and everything below them) a resumed run may change: replicas,
resources and scheduling, how often to checkpoint, and speculative decoding and reallocation
(lossless: they change how fast samples are generated, not which samples)."""

_MAX_VALUE_CHARS = 80


class ResumeRefused(ValueError):
    """--resume with a manifest that changes what the job trains; ``lines`` say which fields."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> leaf value (lists are leaves: a changed list is one changed field)."""
    if isinstance(node, Mapping) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: node}


def _resumable(path: str) -> bool:
    return any(path == field or path.startswith(field + ".") for field in RESUMABLE_FIELDS)


def _show(value: Any) -> str:
    text = "(unset)" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(path, old value, new value) of every field that differs, sorted by path."""
    before, after = flatten(old), flatten(new)
    return [
        (path, before.get(path), after.get(path))
        for path in sorted(set(before) | set(after))
        if before.get(path) != after.get(path)
    ]


def resume_changes(previous: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Compare the run directory's ``job.yaml`` (``previous``) with the manifest a resumed
    run would write. Returns one line per accepted change; raises ResumeRefused listing every
    change that is not accepted (and the accepted ones, so the whole diff is in one place)."""
    old = yaml.safe_load(previous.read_text(encoding="utf-8"))
    if not isinstance(old, Mapping):
        raise ResumeRefused([f"--resume: {previous} is not a manifest; start a new run dir"])
    changes = changed_fields(old, manifest)
    accepted = [c for c in changes if _resumable(c[0])]
    refused = [c for c in changes if not _resumable(c[0])]
    lines = [f"  {path}: {_show(a)} -> {_show(b)}" for path, a, b in accepted]
    if not refused:
        return lines
    header = (
        f"--resume: the manifest changes {len(refused)} field(s) that change what the job "
        f"trains, relative to {previous} (what its checkpoints and Redis state were made "
        "with); restore them, or run without --resume in a new --run-dir:"
    )
    body = [f"  {path}: {_show(a)} -> {_show(b)}" for path, a, b in refused]
    allowed = "may change on resume: " + ", ".join(RESUMABLE_FIELDS)
    raise ResumeRefused([header, *body, *(["  accepted:", *lines] if lines else []), allowed])


def previous_run_processes(run_dir: Path, proc: Path = Path("/proc")) -> list[int]:
    """Pids of processes an earlier run in ``run_dir`` started and that still run: workers
    (their environment names ``run_dir`` as ``RLHFSPEC_STORAGE``) and its redis-server
    (working in ``run_dir/redis``). Empty where /proc cannot be read (not Linux)."""
    storage = f"RLHFSPEC_STORAGE={run_dir}".encode()
    redis_dir = str(run_dir / "redis")
    found = []
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            worker = storage in (entry / "environ").read_bytes().split(b"\0")
            if worker or os.readlink(entry / "cwd") == redis_dir:
                found.append(int(entry.name))
        except OSError:
            continue  # gone, or another user's
    return sorted(found)
