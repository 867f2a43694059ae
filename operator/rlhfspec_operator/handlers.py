"""kopf handlers for RLHFJob: thin glue between the API and the pure builders/status logic.

Where it sits: loaded by ``rlhfspec operator`` (``main``) or ``kopf run -m``. The flow of a job:

* ``start`` (``on.create`` + ``on.resume``): parse once; invalid -> Failed/ValidationFailed and
  nothing else; refused by the cluster's policy (``admission``: images, external Redis host,
  the opt-in label of the password Secret and of Secrets the pod template overrides hand to
  pods) -> Failed/NotAllowed; valid -> create the children from
  ``plan.creation_plan`` (one the job already owns counts as created; a name held
  by anything else fails the job with ChildConflict, naming it), pin the applied spec, status
  Initializing (or Suspended).
* ``pods_by_job`` (``index``): every worker pod condensed to a ``PodView`` under (ns, job).
* ``reconcile`` (``timer``): pods from the index + progress from Redis -> ``status.reconcile``
  -> delete/create pods, post events, patch status. Runs only while the job is active.
* ``expire`` (``timer``): a finished job's ``ttlSecondsAfterFinished`` -> ``ttl`` deletes its
  children (and the job with ``ttlDeletesJob``).
* ``update`` (``on.update`` of spec): accept the mutable fields, re-render the ConfigMap; the
  timer then scales, suspends or resumes.
* ``delete`` (``on.delete``): owned children go with the job (owner references); the job's
  keys in an external Redis are the one thing nothing owns, so they are deleted here.

Events are posted explicitly (kopf >= 1.44 no longer turns log lines into events).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import kopf
from aiohttp import web

from rlhfspec_api import API_GROUP, API_VERSION
from rlhfspec_api.crd import PLURAL
from rlhfspec_api.echo import cap
from rlhfspec_api.errors import FieldError
from rlhfspec_api.manifest import ManifestError, RLHFJob, parse_rlhfjob
from rlhfspec_api.status import TERMINAL_PHASES, Phase
from rlhfspec_operator import admission, builders, managed_redis, metrics, overrides, ttl, updates
from rlhfspec_operator import status as state
from rlhfspec_operator.config import CONFIG
from rlhfspec_operator.credentials import Credentials, NotUsable
from rlhfspec_operator.kube import ApiError, ChildConflict, ChildPending, Kube
from rlhfspec_operator.naming import (
    LABEL_JOB,
    WORKER_ROLES,
    Owner,
    config_map_name,
    desired_pods,
)
from rlhfspec_operator.plan import creation_plan
from rlhfspec_operator.pods import PodView, pod_view
from rlhfspec_operator.progress import ProgressRead
from rlhfspec_operator.redis_progress import ProgressReader
from rlhfspec_operator.spec_condition import track

RESOURCE = (API_GROUP, API_VERSION, PLURAL)
ACTIVE_PHASES = {Phase.INITIALIZING.value, Phase.RUNNING.value, Phase.SUSPENDED.value}
CHILD_CONFLICT = "ChildConflict"
CREDENTIALS_UNUSABLE = "CredentialsUnusable"

kube = Kube()
reader = ProgressReader()
_metrics_server: list[web.AppRunner] = []
credentials = Credentials(kube, CONFIG)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress and diff-base in annotations: the CRD's structural schema would prune a
    # status.kopf field, and our status is the API users read.
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.reporting_component = "rlhfspec-operator"
    settings.posting.level = logging.INFO
    # Least privilege: no list/watch of CRDs and namespaces. Namespaces are given explicitly
    # (or all), and the RLHFJob CRD is installed before the operator (Helm crds/).
    settings.scanning.disabled = True
    # Re-establish watches every few minutes: a silently dropped connection (a proxy, a load
    # balancer) must not leave the operator blind forever.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        kube.set_credentials(info)
    return info


@kopf.on.startup()
async def start_metrics(**_: Any) -> None:
    if CONFIG.metrics_port:
        _metrics_server.append(await metrics.serve(metrics.REGISTRY, CONFIG.metrics_port))


@kopf.on.cleanup()
async def close_clients(**_: Any) -> None:
    await kube.close()
    await reader.close()
    while _metrics_server:
        await _metrics_server.pop().cleanup()


@kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT})
def pods_by_job(body: kopf.Body, namespace: str | None, **_: Any) -> dict[tuple[str, str], PodView]:
    view = pod_view(body)
    if view.role not in WORKER_ROLES:
        return {}  # the Redis pod is not a worker
    return {(namespace or "", view.job): view}


def _parse(body: kopf.Body) -> RLHFJob:
    doc = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": dict(body.metadata),
        "spec": dict(body.spec),
    }
    return parse_rlhfjob(doc)


def _effective(job: RLHFJob, annotations: Mapping[str, str]) -> RLHFJob:
    spec = updates.effective_spec(job.spec, updates.pinned_spec(annotations))
    return RLHFJob(job.name, job.namespace, spec, job.metadata)


def _owner(body: kopf.Body) -> Owner:
    meta = body.metadata
    return Owner(name=str(meta.name), namespace=str(meta.namespace), uid=str(meta.uid))


def _post(body: kopf.Body, events: list[state.Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def _status_patch(old: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge patch from ``old`` to ``new``: removed fields become null; unchanged are left out."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    for key in old:
        if key not in new and key != "kopf":
            patch[key] = None
    return patch


async def _create(body: kopf.Body, obj: dict[str, Any]) -> None:
    """Create a child (ChildConflict propagates: the caller fails the job)."""
    try:
        created = await kube.create(obj)
    except ChildPending as exc:
        kopf.info(body, reason="WaitingForOldChild", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=5) from exc
    except ApiError as exc:
        kind, name = obj["kind"], obj["metadata"]["name"]
        kopf.warn(body, reason="CreateFailed", message=f"cannot create {kind} {name}: {exc}")
        raise kopf.TemporaryError(f"cannot create {kind} {name}: {exc}", delay=10) from exc
    if created:
        kind, name = obj["kind"], obj["metadata"]["name"]
        kopf.info(body, reason="Created", message=f"Created {kind} {name}")


async def _override_secret_errors(job: RLHFJob) -> list[FieldError]:
    """The Secrets ``spec.podTemplateOverrides`` hands to pods exist and are opted in."""
    names = sorted({name for _, name, _ in overrides.secret_references(job)})
    secrets = {name: await kube.get("v1", "Secret", job.namespace, name) for name in names}
    return overrides.secret_reference_errors(job, secrets)


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
async def start(
    body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, **_: Any
) -> None:
    previous = state.parse_status(dict(status))
    if previous.phase in TERMINAL_PHASES:
        return
    now, generation = _now(), meta.get("generation")

    def refuse(lines: list[str], reason: str) -> None:
        failed, event = state.validation_failed(lines, generation, now, reason)
        patch.status.update(_status_patch(dict(status), failed.to_wire()))
        _post(body, [event])

    try:
        job = _parse(body)
        problems = admission.spec_errors(job)
        if problems:
            raise ManifestError(problems)
    except ManifestError as exc:
        refuse([str(e) for e in exc.errors], "ValidationFailed")
        return
    fresh = previous.phase is Phase.PENDING
    if fresh:  # the policy admits jobs; a running job is not failed by a later change of it
        refused = admission.policy_errors(
            job,
            allowed_images=CONFIG.allowed_images,
            allowed_redis_hosts=CONFIG.allowed_redis_hosts,
        )
        if not refused and not managed_redis.managed(job):
            refused = admission.password_secret_errors(job, await credentials.password_secret(job))
        if not refused:
            refused = await _override_secret_errors(job)
        if refused:
            refuse([str(e) for e in refused], admission.POLICY_REASON)
            return
    job = _effective(job, meta.annotations)
    owner = _owner(body)
    created_pods: list[str] = []
    try:
        password = ""
        if managed_redis.managed(job):
            password = await credentials.managed_password(job, owner)
        # Pods of a fresh job right away; after a restart the timer recreates what is missing.
        # The same list `rlhfspec render` prints (plan.creation_plan).
        objects = creation_plan(
            job,
            owner,
            password=password,
            operator_namespace=CONFIG.operator_namespace,
            metrics_from=CONFIG.metrics_from,
            with_pods=fresh and not job.spec.suspend,
        )
        for obj in objects:
            await _create(body, obj)
            if obj["kind"] == "Pod":
                created_pods.append(obj["metadata"]["name"])
    except ChildPending as exc:  # the managed Secret of an earlier job of this name
        raise kopf.TemporaryError(str(exc), delay=5) from exc
    except ChildConflict as exc:
        if fresh:
            refuse([str(exc)], CHILD_CONFLICT)
            for name in created_pods:  # a failed job holds no accelerators
                await kube.delete("v1", "Pod", owner.namespace, name)
        else:  # a resumed job keeps running; the timer fails it if a pod name is taken
            kopf.warn(body, reason=CHILD_CONFLICT, message=str(exc))
        return
    new_status, events = state.started(job, generation, previous, now)
    _post(body, events)
    patch.status.update(_status_patch(dict(status), new_status.to_wire()))
    if updates.APPLIED_SPEC_ANNOTATION not in meta.annotations:
        patch.metadata.annotations[updates.APPLIED_SPEC_ANNOTATION] = updates.pin(job.spec)


def _active(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") in ACTIVE_PHASES


@kopf.timer(*RESOURCE, interval=CONFIG.interval, when=_active)
async def reconcile(
    body: kopf.Body,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    pods_by_job: kopf.Index[tuple[str, str], PodView] | None = None,
    **_: Any,
) -> None:
    try:
        live = _parse(body)
        job = _effective(live, meta.annotations)
        refused = updates.refused_changes(updates.pinned_spec(meta.annotations), live.spec)
    except ManifestError as exc:
        # Valid at start (else it would not be active), invalid since: `update` refused the
        # change and the job keeps running on the spec last accepted.
        refused = [cap("invalid change ignored: " + "; ".join(str(e) for e in exc.errors))]
        pinned = updates.last_accepted(str(meta.name), str(meta.namespace), dict(meta))
        if pinned is None:
            return
        job = pinned
    owner = _owner(body)
    indexed: Iterable[PodView] = (
        pods_by_job.get((owner.namespace, owner.name), []) if pods_by_job else []
    )
    # A job deleted and re-created under the same name must not inherit the old pods.
    pods = [p for p in indexed if p.owner_uid == owner.uid]
    try:
        progress = await reader.read(await credentials.target(job, owner), job.namespace, job.name)
    except ApiError as exc:
        progress = ProgressRead(error=f"cannot read the Redis password: {exc}", attempted=True)
    except NotUsable as exc:
        progress = ProgressRead(error=str(exc), error_reason=CREDENTIALS_UNUSABLE, attempted=True)
    observation = state.Observation(
        job=job,
        generation=meta.get("generation"),
        status=state.parse_status(dict(status)),
        pods=pods,
        progress=progress,
        now=_now(),
    )
    plan = state.reconcile(observation)
    plan.status = track(plan.status, refused, observation.now, observation.generation)
    for name in plan.delete:
        await kube.delete("v1", "Pod", owner.namespace, name)
    roles = desired_pods(job.name, job.spec.generation.replicas)
    try:
        for name in plan.create:
            role, index = roles[name]
            await _create(body, builders.worker_pod(job, owner, role, index))
    except ChildConflict as exc:
        plan = state.fail(observation, CHILD_CONFLICT, str(exc))
        for name in plan.delete:
            await kube.delete("v1", "Pod", owner.namespace, name)
    _post(body, plan.events)
    metrics.REGISTRY.observe(owner.namespace, owner.name, plan.status)
    metrics.REGISTRY.count("rlhfspec_operator_reconciles_total")
    metrics.REGISTRY.count("rlhfspec_operator_pods_created_total", len(plan.create))
    metrics.REGISTRY.count("rlhfspec_operator_pods_deleted_total", len(plan.delete))
    patch.status.update(_status_patch(dict(status), plan.status.to_wire()))


def _expiring(status: kopf.Status, spec: kopf.Spec, **_: Any) -> bool:
    """A finished job with ttlSecondsAfterFinished whose children are still there."""
    return (
        status.get("phase") in {phase.value for phase in TERMINAL_PHASES}
        and spec.get("ttlSecondsAfterFinished") is not None
        and not ttl.cleaned_up(state.parse_status(dict(status)))
    )


@kopf.timer(*RESOURCE, interval=CONFIG.interval, when=_expiring)
async def expire(
    body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, **_: Any
) -> None:
    current, owner, now = state.parse_status(dict(status)), _owner(body), _now()
    try:
        job = _effective(_parse(body), meta.annotations)
    except ManifestError:  # refused before anything was created: only the job itself is left
        if current.phase in TERMINAL_PHASES and body.spec.get("ttlDeletesJob") is True:
            await ttl.delete_job(kube, owner)
        else:
            marked = ttl.mark_cleaned_up(current, [], now, meta.get("generation"))
            patch.status.update(_status_patch(dict(status), marked.to_wire()))
        return
    left = ttl.seconds_left(job.spec.ttl_seconds_after_finished, current, now)
    if left is None or left > 0:
        return
    deleted = await ttl.delete_children(kube, job, owner)
    message = (
        f"ttlSecondsAfterFinished ({job.spec.ttl_seconds_after_finished}s) passed: deleted "
        + (", ".join(deleted) or "nothing")
    )
    kopf.info(body, reason=ttl.TTL_REASON, message=cap(message))
    if job.spec.ttl_deletes_job:
        await ttl.delete_job(kube, owner)
        return
    marked = ttl.mark_cleaned_up(current, deleted, now, meta.get("generation"))
    patch.status.update(_status_patch(dict(status), marked.to_wire()))


@kopf.on.update(*RESOURCE, field="spec")
async def update(
    body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, **_: Any
) -> None:
    if state.parse_status(dict(status)).phase in TERMINAL_PHASES:
        return
    # Events here, once per change; the SpecAccepted condition is the reconcile timer's.
    try:
        live = _parse(body)
    except ManifestError as exc:
        message = cap("invalid change ignored: " + "; ".join(str(e) for e in exc.errors))
        kopf.warn(body, reason="UpdateRejected", message=message)
        return
    pinned = updates.pinned_spec(meta.annotations) or live.spec.to_wire()
    accepted, rejected = updates.split_changes(updates.changed_fields(pinned, live.spec.to_wire()))
    if rejected:
        kopf.warn(body, reason="UpdateRejected", message=updates.refusal(rejected))
    if not accepted:
        return
    job = _effective(live, meta.annotations)
    await kube.patch(
        "v1",
        "ConfigMap",
        job.namespace,
        config_map_name(job.name),
        {"data": {"job.yaml": builders.render_config(job)}},
    )
    patch.metadata.annotations[updates.APPLIED_SPEC_ANNOTATION] = updates.pin(job.spec)
    kopf.info(body, reason="Updated", message="accepted spec." + ", spec.".join(accepted))


@kopf.on.delete(*RESOURCE)
async def delete(body: kopf.Body, meta: kopf.Meta, logger: kopf.Logger, **_: Any) -> None:
    try:
        job = _effective(_parse(body), meta.annotations)
    except ManifestError:
        return
    credentials.forget(job.namespace, job.name, str(meta.uid))
    metrics.REGISTRY.forget(job.namespace, job.name)
    if managed_redis.managed(job):
        return  # Redis, Secret, Services, pods and the owned claim go with the job
    try:
        target = await credentials.target(job, _owner(body))
        count = await reader.delete_job_keys(target, job.namespace, job.name)
    except Exception as exc:  # best effort: an unreachable Redis must not block deletion
        logger.warning(f"could not delete the job's keys in external Redis: {exc}")
        kopf.warn(body, reason="CleanupFailed", message=f"job keys left in Redis: {exc}")
        return
    kopf.info(body, reason="CleanedUp", message=f"deleted {count} keys from external Redis")
