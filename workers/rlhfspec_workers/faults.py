"""Named fault hooks: a worker SIGKILLs itself at a chosen point, so tests kill for real.

Where it sits: ``fault_point("<name>")`` calls sit in the workers at the moments a crash is
hardest to survive (mid weight write, between consuming and acking, mid-iteration). The
entrypoint (``rlhfspec worker ROLE``) calls :func:`arm_from_environ` once at start, and
``rlhfspec run`` checks the variable with :func:`parse_fault` before it starts anything; the
fault tests (``tests/faults/``) set the variable and restart the killed worker as Kubernetes
would. Never set it in production.

The variable::

    RLHFSPEC_FAULT=<worker>:<point>[:<nth>]

``<worker>`` is a role (``trainer``: any trainer process) or one worker (``generation-1``);
``<point>`` is a name of :data:`FAULT_POINTS`; ``<nth>`` (default 1) is which time the point
is reached in the process. When it is reached that time, the process writes the marker
``<storage>/faults/<worker>.<point>.<nth>.fired`` (fsynced) and sends itself SIGKILL: no
handler, no ``finally``, no flush runs, exactly as an OOM kill or a lost node.

Why a marker on the job's storage and not "restart without the variable": a restarted pod
keeps its environment, so a fault meant to happen once would crash-loop the pod. The marker
lives with the job's storage (what a restarted pod keeps), so the restarted process sees it
and does not fire again; local restarts can then reuse the exact same environment too.

Unset (every production process), :func:`fault_point` costs one dict lookup. A variable that
names no hook, an unknown role, or an ``nth`` that is not a positive integer is refused at
start, with the list of hooks (:class:`FaultSpecError`).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "RLHFSPEC_FAULT"
ROLES = ("coordinator", "generation", "inference", "trainer")

FAULT_POINTS: dict[str, str] = {
    "mid_weight_write": (
        "trainer: the new policy's files are written into the temporary weights dir, not yet "
        "renamed to weights/v<N> (and not yet published)"
    ),
    "after_weight_publish": (
        "trainer: weights/v<N> is published in Redis, the iteration's experiences are not acked yet"
    ),
    "mid_weight_load": (
        "generation: vLLM has reloaded the new policy's weights, the packed embedding copies "
        "are not refreshed yet (a half-loaded engine); no task of the new iteration is taken"
    ),
    "before_publish_rollouts": (
        "generation: a step's samples finished in vLLM, none of them published; their tasks "
        "are unacked"
    ),
    "after_publish_rollouts": (
        "generation: a step's rollouts are published, marked done and their tasks acked (one "
        "transaction); the samples still decoding have unacked tasks"
    ),
    "before_publish_experiences": (
        "inference: a batch of rollouts is read and scored, no experience published, no "
        "rollout acked"
    ),
    "after_export_kv": (
        "generation (migration source): a running sample's KV snapshot is in this worker's "
        "outbox and its resumable task handed to the destination; its own task is not acked"
    ),
    "before_import_kv": (
        "generation (migration destination): a moved sample's KV snapshot is pulled and "
        "verified, not yet loaded into vLLM; the handed-over task is not acked"
    ),
    "coordinator_mid_iteration": (
        "coordinator: an iteration's tasks are published and recorded, the iteration is not "
        "finished"
    ),
}
"""Every hook placed in the code, with the moment it stands for. A test checks that each is
placed exactly once and that no placed call names a hook missing here."""

_WORKER = re.compile(r"^(?P<role>[a-z]+)(?:-(?P<index>\d+))?$")


class FaultSpecError(ValueError):
    """``RLHFSPEC_FAULT`` does not name an existing hook (the message lists them)."""


@dataclass(frozen=True)
class FaultSpec:
    worker: str
    """A role (every process of it) or one worker's name (``generation-1``)."""
    point: str
    nth: int = 1

    def applies_to(self, role: str, worker: str) -> bool:
        return self.worker in (role, worker)


def _hooks() -> str:
    return ", ".join(sorted(FAULT_POINTS))


def parse_fault(value: str) -> FaultSpec:
    """``<worker>:<point>[:<nth>]`` -> :class:`FaultSpec`; :class:`FaultSpecError` naming the
    part that is wrong and what is allowed."""
    parts = value.strip().split(":")
    if len(parts) not in (2, 3):
        raise FaultSpecError(
            f"{ENV_VAR}={value!r}: expected <worker>:<point>[:<nth>] (hooks: {_hooks()})"
        )
    worker, point = parts[0], parts[1]
    match = _WORKER.match(worker)
    if match is None or match.group("role") not in ROLES:
        raise FaultSpecError(
            f"{ENV_VAR}={value!r}: worker {worker!r} unknown (allowed: a role of "
            f"{', '.join(ROLES)}, or <role>-<index> such as generation-1)"
        )
    if point not in FAULT_POINTS:
        raise FaultSpecError(f"{ENV_VAR}={value!r}: no fault hook {point!r} (hooks: {_hooks()})")
    nth = 1
    if len(parts) == 3:
        try:
            nth = int(parts[2])
        except ValueError:
            nth = 0
        if nth < 1:
            raise FaultSpecError(
                f"{ENV_VAR}={value!r}: nth {parts[2]!r} is not allowed (a positive integer)"
            )
    return FaultSpec(worker, point, nth)


@dataclass
class _Armed:
    spec: FaultSpec
    marker: Path
    reached: int = 0


_armed: dict[str, _Armed] = {}
"""point -> the armed fault; empty unless this process was started with the variable."""


def marker_path(storage: Path, worker: str, spec: FaultSpec) -> Path:
    """Where the fired fault leaves its mark (the job's storage survives the restart)."""
    return Path(storage) / "faults" / f"{worker}.{spec.point}.{spec.nth}.fired"


def arm_from_environ(
    role: str, worker: str, storage: Path, environ: Mapping[str, str] | None = None
) -> FaultSpec | None:
    """Read ``RLHFSPEC_FAULT`` once at process start; arm it when it names this process and
    has not fired yet on this job's storage. Returns the armed spec (None: nothing armed).
    :class:`FaultSpecError` when the variable is malformed, whoever it names."""
    _armed.clear()
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not value:
        return None
    spec = parse_fault(value)
    if not spec.applies_to(role, worker):
        return None
    marker = marker_path(storage, worker, spec)
    if marker.exists():
        return None  # fired in an earlier incarnation of this worker: run normally now
    _armed[spec.point] = _Armed(spec, marker)
    return spec


def fault_point(name: str) -> None:
    """The named moment: SIGKILL this process if the armed fault is for here and now."""
    armed = _armed.get(name)
    if armed is None:
        return
    armed.reached += 1
    if armed.reached < armed.spec.nth:
        return
    _armed.pop(name, None)
    _leave_marker(armed.marker)
    print(f"[rlhfspec] fault injected: SIGKILL at {name} (time {armed.reached})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _leave_marker(marker: Path) -> None:
    """Write and fsync the marker (and its dir) before dying, so the restart sees it."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(marker.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
