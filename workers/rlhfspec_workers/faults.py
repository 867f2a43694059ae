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

A hold instead of a kill (same grammar, same hooks)::

    RLHFSPEC_HOLD=<worker>:<point>[:<nth>]

When the point is reached that time, the process writes ``<...>.held`` (fsynced) and waits,
doing nothing else, until ``<...>.release`` exists next to it (``hold_markers``). A test uses it
to freeze a worker at a known moment (e.g. a generation worker between two engine steps, its
samples provably a few tokens in), act on the frozen state, then let it go: what would
otherwise be a race with the worker's own pace becomes a fixed order. The ``held`` marker
keeps a restarted process from holding again, as ``fired`` does.

Unset (every production process), :func:`fault_point` costs one dict lookup. A variable that
names no hook, an unknown role, or an ``nth`` that is not a positive integer is refused at
start, with the list of hooks (:class:`FaultSpecError`).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "RLHFSPEC_FAULT"
HOLD_ENV_VAR = "RLHFSPEC_HOLD"
HOLD_POLL_SECONDS = 0.01
HOLD_MAX_SECONDS = 300.0
"""A hold nobody releases (its test died) ends by itself: the process is never stuck for good."""
ROLES = ("coordinator", "generation", "inference", "trainer")

FAULT_POINTS: dict[str, str] = {
    "mid_weight_write": (
        "trainer: the new policy's files are written into the temporary weights dir, not yet "
        "renamed to weights/v<N> (and not yet published)"
    ),
    "after_weight_publish": (
        "trainer: weights/v<N> is published in Redis, the iteration's experiences are not acked yet"
    ),
    "mid_draft_write": (
        "trainer: a refreshed draft model's files are written into the temporary drafts dir, "
        "not yet renamed to drafts/v<N>; the policy's weights/v<N> is not yet published"
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
    "after_engine_step": (
        "generation: an engine step ran and is being recorded (reached once per step); the "
        "samples still decoding have unacked tasks. Held here, a worker decodes nothing"
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


def parse_fault(value: str, variable: str = ENV_VAR) -> FaultSpec:
    """``<worker>:<point>[:<nth>]`` -> :class:`FaultSpec`; :class:`FaultSpecError` naming the
    part that is wrong and what is allowed (``variable``: which one it came from)."""
    parts = value.strip().split(":")
    if len(parts) not in (2, 3):
        raise FaultSpecError(
            f"{variable}={value!r}: expected <worker>:<point>[:<nth>] (hooks: {_hooks()})"
        )
    worker, point = parts[0], parts[1]
    match = _WORKER.match(worker)
    if match is None or match.group("role") not in ROLES:
        raise FaultSpecError(
            f"{variable}={value!r}: worker {worker!r} unknown (allowed: a role of "
            f"{', '.join(ROLES)}, or <role>-<index> such as generation-1)"
        )
    if point not in FAULT_POINTS:
        raise FaultSpecError(f"{variable}={value!r}: no fault hook {point!r} (hooks: {_hooks()})")
    nth = 1
    if len(parts) == 3:
        try:
            nth = int(parts[2])
        except ValueError:
            nth = 0
        if nth < 1:
            raise FaultSpecError(
                f"{variable}={value!r}: nth {parts[2]!r} is not allowed (a positive integer)"
            )
    return FaultSpec(worker, point, nth)


@dataclass
class _Armed:
    spec: FaultSpec
    marker: Path
    hold: bool = False
    """Wait for the release file instead of dying."""
    reached: int = 0


_armed: dict[str, list[_Armed]] = {}
"""point -> what is armed there (a hold before a kill); empty unless this process was started
with a variable naming it."""


def marker_path(storage: Path, worker: str, spec: FaultSpec, kind: str = "fired") -> Path:
    """Where the fired fault (``kind`` fired) or hold (held, release) leaves its mark: on the
    job's storage, which survives the restart."""
    return Path(storage) / "faults" / f"{worker}.{spec.point}.{spec.nth}.{kind}"


def hold_markers(storage: Path, worker: str, spec: FaultSpec) -> tuple[Path, Path]:
    """(held, release): the held process writes the first; whoever holds it creates the second
    to let it go."""
    return marker_path(storage, worker, spec, "held"), marker_path(storage, worker, spec, "release")


def arm_from_environ(
    role: str, worker: str, storage: Path, environ: Mapping[str, str] | None = None
) -> FaultSpec | None:
    """Read ``RLHFSPEC_FAULT`` and ``RLHFSPEC_HOLD`` once at process start; arm each that names
    this process and has not fired (held) yet on this job's storage. Returns the armed fault
    (None: no kill armed). :class:`FaultSpecError` when either is malformed, whoever it names."""
    _armed.clear()
    source = os.environ if environ is None else environ
    specs = {
        variable: parse_fault(value, variable)
        for variable in (HOLD_ENV_VAR, ENV_VAR)  # a hold is checked before a kill
        if (value := source.get(variable, "").strip())
    }
    fault = None
    for variable, spec in specs.items():
        hold = variable == HOLD_ENV_VAR
        marker = marker_path(storage, worker, spec, "held" if hold else "fired")
        if not spec.applies_to(role, worker) or marker.exists():
            continue  # someone else's, or done in an earlier incarnation: run normally now
        _armed.setdefault(spec.point, []).append(_Armed(spec, marker, hold=hold))
        fault = fault if hold else spec
    return fault


def fault_point(name: str) -> None:
    """The named moment: SIGKILL this process (or hold it) if armed for here and now."""
    armed = _armed.get(name)
    if not armed:
        return
    for entry in list(armed):
        entry.reached += 1
        if entry.reached < entry.spec.nth:
            continue
        armed.remove(entry)
        _leave_marker(entry.marker)
        if entry.hold:
            _hold(name, entry)
            continue
        print(f"[rlhfspec] fault injected: SIGKILL at {name} (time {entry.reached})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _hold(name: str, entry: _Armed) -> None:
    """Do nothing until the release file appears (HOLD_MAX_SECONDS at most)."""
    release = entry.marker.with_suffix(".release")
    print(f"[rlhfspec] fault hold at {name} (time {entry.reached}) until {release}", flush=True)
    deadline = time.monotonic() + HOLD_MAX_SECONDS
    while not release.exists():
        if time.monotonic() > deadline:
            print(f"[rlhfspec] fault hold at {name}: not released, going on", flush=True)
            return
        time.sleep(HOLD_POLL_SECONDS)
    print(f"[rlhfspec] fault hold at {name}: released", flush=True)


def _leave_marker(marker: Path) -> None:
    """Write and fsync the marker (and its dir) before dying or holding, so the restart sees
    it."""
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
