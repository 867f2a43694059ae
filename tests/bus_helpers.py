"""Shared by tests that talk to a real redis-server through the runtime's Bus.

Where it sits: importable from every test folder (``tests/`` is on the path through its
conftest). :func:`bus_on` is the Bus a worker of ``role`` would open on a test server,
:func:`job_spec` the smallest valid job spec, with overrides merged one level deep, and
:func:`acceptance_report` a worker's AcceptanceReport of a drafter accepting at a given rate.
"""

from __future__ import annotations

from typing import Any

from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_api.spec import RLHFJobSpec
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import AcceptanceReport
from rlhfspec_workers.runtime import Bus, WorkerEnv


def bus_on(
    server: RedisServer, role: str = "coordinator", password: str | None = None, **env: str
) -> Bus:
    """A Bus for a ``role`` worker of job ``job`` on ``server`` (extra RLHFSPEC_* in ``env``)."""
    values = {
        "RLHFSPEC_JOB": "job",
        "RLHFSPEC_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
        "RLHFSPEC_JOB_CONFIG": "/nonexistent.yaml",
        **env,
    }
    if password is not None:
        values["RLHFSPEC_REDIS_PASSWORD"] = password
    return Bus(WorkerEnv.from_environ(role, values))


def job_spec(**spec: Any) -> RLHFJobSpec:
    """The tiny policy on a placeholder dataset, adaptive speculation up to k = 8, 1Gi storage;
    ``spec`` overrides whole top-level fields."""
    body: dict[str, Any] = {
        "models": {"policy": {"path": "tiny://policy"}},
        "dataset": {"path": "x.jsonl"},
        "generation": {"speculative": {"mode": "adaptive", "maxDraftTokens": 8}},
        "storage": {"size": "1Gi"},
        **spec,
    }
    manifest = {
        "apiVersion": "rlhfspec.io/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": "job"},
        "spec": body,
    }
    return parse_rlhfjob(manifest).spec


def acceptance_report(
    drafter: str = "draft_model",
    rate: float = 0.5,
    *,
    drafts: int = 400,
    k: int = 8,
    worker: str = "generation-0",
    weight_version: int = 0,
) -> AcceptanceReport:
    """``drafts`` drafts of ``k`` tokens, position i accepted with probability rate**(i+1)."""
    drafted, accepted, reached = [], [], float(drafts)
    for _ in range(k):
        drafted.append(drafts)
        reached *= rate
        accepted.append(round(reached))
    return AcceptanceReport(
        worker=worker, weight_version=weight_version, drafter=drafter, drafts=drafts,
        drafted_per_pos=drafted, accepted_per_pos=accepted,
    )  # fmt: skip
