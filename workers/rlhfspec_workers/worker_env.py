"""The operator -> worker contract: the environment every worker process starts with.

Where it sits: below ``runtime`` (which re-exports it). ``rlhfspec worker ROLE``
(``entrypoint``) reads a :class:`WorkerEnv` from the pod's environment, set by the operator on
a cluster and by ``local.supervisor.local_worker_env`` on this machine, and opens the job's
``runtime.Bus`` with it. A value that breaks the contract raises :class:`WorkerEnvError`
naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rlhfspec_api.manifest import RLHFJob, load_rlhfjob
from rlhfspec_workers.worker_names import ROLES, worker_name


class WorkerEnvError(ValueError):
    """The process environment does not satisfy the worker contract."""


@dataclass(frozen=True)
class WorkerEnv:
    """The operator -> worker contract (environment variables of every worker pod)."""

    job: str
    namespace: str
    role: str
    index: int
    replicas: int
    redis_url: str
    redis_password: str | None
    job_config: Path
    storage: Path
    metrics_port: int
    pod_name: str
    kv_port: int = 0
    """Where a generation worker serves KV snapshots of samples it migrates away (0: any free
    port, local mode)."""
    kv_host: str = "127.0.0.1"
    """How other workers reach it: the operator sets the pod's DNS name (hostname.subdomain of
    its role's headless service); local mode keeps the loopback."""
    kv_secret: str | None = field(default=None, repr=False)
    """The job's KV key (generation workers): pulls of KV snapshots are authorised with it and
    snapshots sealed with it (``generation.kv_auth``). The operator's ``<job>-kv`` Secret, one
    per run in local mode; without it a worker neither serves nor loads snapshots."""
    redis_password_source: str = "RLHFSPEC_REDIS_PASSWORD"
    """Where the password comes from, for the error when Redis refuses it (the operator names
    the Secret and key)."""
    redis_ca_file: Path | None = None
    """CA bundle that verifies a ``rediss://`` server (None: the system's CAs)."""
    local: bool = False
    """Started by local mode (``RLHFSPEC_LOCAL=1``), which may read this machine's files;
    anything else is a cluster pod, where preflight refuses paths on the pod's filesystem."""

    @property
    def worker(self) -> str:
        """Stable name of this worker (its consumer name in Redis groups)."""
        return worker_name(self.role, self.index)

    @classmethod
    def from_environ(cls, role: str, environ: Mapping[str, str] | None = None) -> WorkerEnv:
        env = os.environ if environ is None else environ
        if role not in ROLES:
            raise WorkerEnvError(f"role {role!r} unknown (allowed: {', '.join(ROLES)})")
        missing = [
            name
            for name in ("RLHFSPEC_JOB", "RLHFSPEC_REDIS_URL", "RLHFSPEC_JOB_CONFIG")
            if not env.get(name)
        ]
        if missing:
            raise WorkerEnvError(f"environment variable(s) {', '.join(missing)} not set")
        declared = env.get("RLHFSPEC_ROLE")
        if declared and declared != role:
            raise WorkerEnvError(f"RLHFSPEC_ROLE is {declared!r} but the command runs {role!r}")

        def number(name: str, default: int) -> int:
            raw = env.get(name, str(default))
            try:
                return int(raw)
            except ValueError:
                raise WorkerEnvError(f"{name}={raw!r} is not an integer") from None

        return cls(
            job=env["RLHFSPEC_JOB"],
            namespace=env.get("RLHFSPEC_NAMESPACE", "default"),
            role=role,
            index=number("RLHFSPEC_WORKER_INDEX", 0),
            replicas=number("RLHFSPEC_REPLICAS", 1),
            redis_url=env["RLHFSPEC_REDIS_URL"],
            redis_password=env.get("RLHFSPEC_REDIS_PASSWORD") or None,
            job_config=Path(env["RLHFSPEC_JOB_CONFIG"]),
            storage=Path(env.get("RLHFSPEC_STORAGE", "/data")),
            metrics_port=number("RLHFSPEC_METRICS_PORT", 0),
            pod_name=env.get("RLHFSPEC_POD_NAME", ""),
            kv_port=number("RLHFSPEC_KV_PORT", 0),
            kv_host=env.get("RLHFSPEC_KV_HOST") or "127.0.0.1",
            kv_secret=_kv_secret(env.get("RLHFSPEC_KV_SECRET")),
            redis_password_source=env.get("RLHFSPEC_REDIS_PASSWORD_SOURCE")
            or "RLHFSPEC_REDIS_PASSWORD",
            redis_ca_file=Path(env["RLHFSPEC_REDIS_CA_FILE"])
            if env.get("RLHFSPEC_REDIS_CA_FILE")
            else None,
            local=env.get("RLHFSPEC_LOCAL") == "1",
        )

    def load_job(self) -> RLHFJob:
        return load_rlhfjob(self.job_config)


MIN_KV_SECRET_CHARS = 32


def _kv_secret(raw: str | None) -> str | None:
    if not raw:
        return None
    if len(raw) < MIN_KV_SECRET_CHARS:  # a guessable key would authorise anyone
        raise WorkerEnvError(
            f"RLHFSPEC_KV_SECRET has {len(raw)} characters, at least {MIN_KV_SECRET_CHARS} needed"
        )
    return raw
