"""The fetch init container of a worker pod, and the ``ModelsReady`` condition read back from it
(pure: manifests and status values in, no API calls).

Where it sits: ``builders.worker_pod`` calls :func:`fetch_init_container` for every worker pod;
when the job names an ``hf://``, ``https://`` or ``s3://`` model or dataset, the pod gets an init
container running ``rlhfspec worker fetch`` (``rlhfspec_workers.fetch``), which downloads them
into the job's storage before the worker's preflight reads them. ``pods.pod_view`` condenses
that container's status with :func:`fetch_state`, and ``status.reconcile`` turns the pods'
states into the job's ``ModelsReady`` condition with :func:`set_models_ready`.

Why an init container on every worker pod and not one fetch Job: see the workers' ``fetch``
package (every worker reads every model at start; concurrent fetchers of one URI are made
harmless by the atomic install, and later pods reuse the copy without a request).

The init container runs the job's image with the worker's security context and resources
(no accelerator: a download needs none), mounts only the job config, the storage at ``/data``
and a scratch ``/tmp``, and gets credentials only from the Secret keys ``spec.credentials``
names, as ``secretKeyRef`` env; never from the operator's own environment.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from rlhfspec_api.locations import locations
from rlhfspec_api.manifest import RLHFJob
from rlhfspec_api.models import FETCHED_SCHEMES
from rlhfspec_api.status import ConditionStatus, ConditionType, RLHFJobStatus
from rlhfspec_operator.conditions import condition, set_condition
from rlhfspec_operator.naming import CONFIG_DIR, CONFIG_KEY, STORAGE_DIR

FETCH_CONTAINER = "fetch"
FETCH_MOUNTS = ("config", "storage", "tmp")
"""The worker's volumes the fetch reads or writes; reward modules, CAs and shm it never needs."""
FAILURE_PREFIX = "fetch failed: "
"""How ``rlhfspec worker fetch`` starts each failure line of its termination message."""
FETCHED_PREFIX = "fetched: "
"""... and each line of a location it fetched or reused (with its size and time)."""

# States of a pod's fetch init container (:func:`fetch_state`).
FETCH_WAITING = ""
FETCH_RUNNING = "running"
FETCH_DONE = "done"
FETCH_FAILED = "failed"
FETCH_BLOCKED = "blocked"
"""The init container cannot start: a missing Secret or key, an image that does not pull."""
STARTING_REASONS = ("PodInitializing", "ContainerCreating")
"""Waiting reasons that only mean "not started yet"."""


def remote_locations(job: RLHFJob) -> list[str]:
    """The job's fetched locations (``hf://``, ``https://``, ``s3://``), each once."""
    found = [
        location
        for _, location in locations(job.spec)
        if location.partition("://")[0] in FETCHED_SCHEMES and "://" in location
    ]
    return list(dict.fromkeys(found))


def fetch_env(job: RLHFJob) -> list[dict[str, Any]]:
    """The init container's environment: where the job and its storage are, and the named
    credentials (each a ``secretKeyRef``; the Secret must exist or the pod does not start)."""
    env: list[dict[str, Any]] = [
        {"name": "RLHFSPEC_JOB_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "RLHFSPEC_STORAGE", "value": STORAGE_DIR},
        # The root filesystem is read-only: the hub client's own caches go to /tmp.
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
    ]
    credentials = job.spec.credentials
    if credentials is None:
        return env
    secrets = [("HF_TOKEN", credentials.hf_token)]
    s3 = credentials.s3
    if s3 is not None:
        env.append({"name": "AWS_REGION", "value": s3.region})
        if s3.endpoint is not None:
            env.append({"name": "AWS_ENDPOINT_URL", "value": s3.endpoint})
        secrets += [
            ("AWS_ACCESS_KEY_ID", s3.access_key_id),
            ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key),
        ]
    for name, ref in secrets:
        if ref is not None:
            env.append(
                {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            )
    return env


def fetch_init_container(job: RLHFJob, worker: Mapping[str, Any]) -> dict[str, Any] | None:
    """The init container for a pod whose main container is ``worker``; None when the job
    has nothing to fetch."""
    if not remote_locations(job):
        return None
    limits = {k: v for k, v in worker["resources"]["limits"].items() if k in ("cpu", "memory")}
    return {
        "name": FETCH_CONTAINER,
        "image": worker["image"],
        "command": ["rlhfspec", "worker", "fetch"],
        "env": fetch_env(job),
        # Requests equal limits, as for the worker: the pod keeps Guaranteed QoS.
        "resources": {"requests": dict(limits), "limits": dict(limits)},
        "volumeMounts": [
            copy.deepcopy(m) for m in worker["volumeMounts"] if m["name"] in FETCH_MOUNTS
        ],
        # Its failure lines (URI, HTTP status) become the termination message ModelsReady quotes.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(worker["securityContext"]),
    }


def fetch_state(pod_status: Mapping[str, Any]) -> tuple[str, str]:
    """(state, message) of a pod's fetch init container from the pod's ``status``: waiting
    (or no such container), blocked with the kubelet's reason, running, done, or failed with
    its termination message."""
    for entry in pod_status.get("initContainerStatuses") or []:
        if entry.get("name") != FETCH_CONTAINER:
            continue
        state = entry.get("state") or {}
        if "running" in state:
            return FETCH_RUNNING, ""
        if "terminated" in state:
            term = state["terminated"] or {}
            if term.get("exitCode") == 0:
                return FETCH_DONE, _lines(term, FETCHED_PREFIX)
            return FETCH_FAILED, _failure_text(term)
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason")
        if reason and reason not in STARTING_REASONS:
            detail = str(waiting.get("message") or "").strip()
            return FETCH_BLOCKED, f"{reason}: {detail}" if detail else str(reason)
    return FETCH_WAITING, ""


def _lines(term: Mapping[str, Any], prefix: str) -> str:
    message = str(term.get("message") or "")
    lines = [line for line in message.splitlines() if line.startswith(prefix)]
    return "; ".join(line.removeprefix(prefix) for line in lines)


def _failure_text(term: Mapping[str, Any]) -> str:
    failures = _lines(term, FAILURE_PREFIX)
    if failures:
        return failures
    message = str(term.get("message") or "").strip()
    why = f"{term.get('reason') or 'Error'} (exit code {term.get('exitCode')})"
    return f"{why}: {message}" if message else why


class FetchingPod(Protocol):
    """What :func:`set_models_ready` reads of a pod (``pods.PodView`` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def fetch(self) -> str: ...
    @property
    def fetch_message(self) -> str: ...


def set_models_ready(
    status: RLHFJobStatus,
    job: RLHFJob,
    pods: Sequence[FetchingPod],
    now: datetime.datetime,
    generation: int | None,
) -> None:
    """Upsert ``ModelsReady`` from the pods' fetch states (nothing for a job with nothing to
    fetch). One pod's finished fetch means every location is in the storage (each pod fetches
    them all), so True is kept while later pods start; a failure names the URI and status."""
    uris = remote_locations(job)
    if not uris:
        return
    named = ", ".join(uris)
    done = [p for p in pods if p.fetch == FETCH_DONE]
    failed = [p for p in pods if p.fetch == FETCH_FAILED]
    running = [p for p in pods if p.fetch == FETCH_RUNNING]
    blocked = sorted((p for p in pods if p.fetch == FETCH_BLOCKED), key=lambda p: p.name)
    previous = condition(status, ConditionType.MODELS_READY)

    def put(value: ConditionStatus, reason: str, message: str) -> None:
        set_condition(status, ConditionType.MODELS_READY, value, reason, message, now, generation)

    if done:
        # The pod that downloaded says how much and how long; the others only reused.
        teller = next((p for p in done if "downloaded" in p.fetch_message), done[0])
        summary = f"pod {teller.name}: {teller.fetch_message}" if teller.fetch_message else ""
        put(ConditionStatus.TRUE, "Fetched", summary or f"in the job's storage: {named}")
    elif failed:
        first = sorted(failed, key=lambda p: p.name)[0]
        put(ConditionStatus.FALSE, "FetchFailed", f"pod {first.name}: {first.fetch_message}")
    elif previous is not None and previous.status is ConditionStatus.TRUE:
        return
    elif running:
        put(ConditionStatus.FALSE, "Fetching", f"{len(running)} pod(s) fetching {named}")
    elif blocked:
        message = f"pod {blocked[0].name}: the fetch cannot start: {blocked[0].fetch_message}"
        put(ConditionStatus.FALSE, "FetchBlocked", message)
    else:
        put(ConditionStatus.FALSE, "Pending", f"waiting for a pod to fetch {named}")
