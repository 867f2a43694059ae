"""The roles of a job's worker processes and the one way their names are built and read back.

Where it sits: below ``runtime`` (``WorkerEnv.worker`` is :func:`worker_name`); a name is the
worker's consumer name in Redis groups, its field in the heartbeat hash and the suffix of its
own keys (``messages.Keys.load``, ``direct_tasks``, ``migrations_for``). The coordinator builds
the generation replicas' names from their count and reads an index back from a name.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("coordinator", "generation", "inference", "trainer")


@dataclass(frozen=True)
class WorkerName:
    role: str
    index: int


def worker_name(role: str, index: int) -> str:
    """``<role>-<index>``: ``generation-0`` is the first generation replica."""
    if role not in ROLES:
        raise ValueError(f"worker role {role!r} unknown (allowed: {', '.join(ROLES)})")
    if index < 0:
        raise ValueError(f"worker index {index} is negative (allowed: 0 or more)")
    return f"{role}-{index}"


def parse_worker_name(name: str) -> WorkerName:
    """The role and index :func:`worker_name` built ``name`` from; anything else is refused."""
    role, _, index = name.rpartition("-")
    if role not in ROLES or not (index.isascii() and index.isdigit()) or index != str(int(index)):
        raise ValueError(
            f"worker name {name!r} is not <role>-<index> (role one of {', '.join(ROLES)}; "
            "index 0 or more, without leading zeros)"
        )
    return WorkerName(role, int(index))
