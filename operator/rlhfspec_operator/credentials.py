"""Which Redis the operator reaches for a job, and with which password: only what it may use.

Where it sits: the handlers ask :class:`Credentials` for the managed password when they create
the job's Redis Secret (``start``), for the external password Secret when they admit a job,
and for a :class:`~rlhfspec_operator.redis_progress.RedisTarget` on every reconcile tick and on
delete. The operator reads Secrets with its own service account, so nothing here reads a Secret
the job may not use: the managed one only when the job owns it, an external one only when it
carries the opt-in label (``admission``) and only for a host the cluster's policy allows. Every
refusal is a :class:`NotUsable` whose message names the Secret, key or host.
"""

from __future__ import annotations

import time
from typing import Any

from rlhfspec_api.manifest import RLHFJob
from rlhfspec_operator import admission, managed_redis
from rlhfspec_operator.config import OperatorConfig
from rlhfspec_operator.kube import ChildConflict, ChildPending, Kube
from rlhfspec_operator.naming import Owner, redis_name
from rlhfspec_operator.redis_progress import RedisTarget

PASSWORD_TTL = 300.0  # seconds an external password is trusted before the Secret is re-read


class NotUsable(Exception):
    """The job's Redis may not be reached with what it names (host, Secret): why, in words."""


def _managed_secret(job: RLHFJob, owner: Owner) -> dict[str, Any]:
    """The managed password Secret as the job would own it (ownership is checked against it)."""
    return managed_redis.password_secret(job, owner, "")


class Credentials:
    """Reads (and caches per job uid) what the operator needs to reach a job's Redis."""

    def __init__(self, kube: Kube, config: OperatorConfig) -> None:
        self._kube = kube
        self._config = config
        self._targets: dict[tuple[str, str, str], tuple[float, RedisTarget]] = {}

    async def managed_password(self, job: RLHFJob, owner: Owner) -> str:
        """The existing managed Secret's password when the job owns it, or a new one (never
        rotated). ChildConflict/ChildPending when someone else holds the Secret's name."""
        secret = await self._kube.get("v1", "Secret", job.namespace, redis_name(job.name))
        if secret is not None:
            self._kube.check_owned(secret, _managed_secret(job, owner))
            value = managed_redis.decode_secret_value(secret, "password")
            if value:
                return value
        return managed_redis.new_password()

    async def password_secret(self, job: RLHFJob) -> dict[str, Any] | None:
        """The external password Secret as stored (None: not found or none named)."""
        ref = job.spec.coordinator.password_secret
        if ref is None:
            return None
        return await self._kube.get("v1", "Secret", job.namespace, ref.name)

    def url(self, job: RLHFJob) -> str:
        if managed_redis.managed(job) and self._config.coordinator_url:
            return self._config.coordinator_url
        return managed_redis.redis_url(job)

    async def target(self, job: RLHFJob, owner: Owner) -> RedisTarget:
        """How to reach the job's Redis; NotUsable when the policy or the Secret forbids it.
        The external Secret is re-checked at every re-read: removing its label stops the
        operator from using it within PASSWORD_TTL."""
        if not managed_redis.managed(job):
            refused = admission.policy_errors(
                job, allowed_images=(), allowed_redis_hosts=self._config.allowed_redis_hosts
            )
            if refused:
                raise NotUsable("; ".join(str(e) for e in refused))
        key = (job.namespace, job.name, owner.uid)
        cached = self._targets.get(key)
        if cached is not None and (managed_redis.managed(job) or time.monotonic() < cached[0]):
            return cached[1]
        url, ca_data = self.url(job), await self._ca_data(job)
        ref = managed_redis.password_ref(job)
        if ref is None:
            target = RedisTarget(url, ca_data=ca_data)
            self._targets[key] = (time.monotonic() + PASSWORD_TTL, target)
            return target
        secret = await self._kube.get("v1", "Secret", job.namespace, ref[0])
        if managed_redis.managed(job):
            if secret is None:
                raise NotUsable(f"Secret {job.namespace}/{ref[0]} (the managed password) not found")
            try:
                self._kube.check_owned(secret, _managed_secret(job, owner))
            except (ChildConflict, ChildPending) as exc:
                raise NotUsable(str(exc)) from exc
        else:
            refused = admission.password_secret_errors(job, secret)
            if refused:
                raise NotUsable("; ".join(str(e) for e in refused))
        assert secret is not None  # both branches raised otherwise
        target = RedisTarget(
            url,
            managed_redis.decode_secret_value(secret, ref[1]),
            password_source=f"Secret {job.namespace}/{ref[0]}, key {ref[1]}",
            ca_data=ca_data,
        )
        self._targets[key] = (time.monotonic() + PASSWORD_TTL, target)
        return target

    async def _ca_data(self, job: RLHFJob) -> str | None:
        """The PEM bundle of ``spec.coordinator.caConfigMap`` (None: the system's CAs)."""
        ref = job.spec.coordinator.ca_config_map
        if ref is None:
            return None
        config_map = await self._kube.get("v1", "ConfigMap", job.namespace, ref.name)
        value = ((config_map or {}).get("data") or {}).get(ref.key)
        if not value:
            raise NotUsable(
                f"spec.coordinator.caConfigMap: ConfigMap {job.namespace}/{ref.name} has no key "
                f"{ref.key!r} (a PEM CA bundle)"
                if config_map is not None
                else f"spec.coordinator.caConfigMap: ConfigMap {job.namespace}/{ref.name} not found"
            )
        return str(value)

    def forget(self, namespace: str, name: str, uid: str) -> None:
        self._targets.pop((namespace, name, uid), None)
