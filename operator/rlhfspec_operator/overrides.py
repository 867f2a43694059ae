"""Pure: merge ``spec.podTemplateOverrides`` and Kueue's gang metadata into the job's pods.

Where it sits: the last step of pod building. ``builders.worker_pod`` calls
:func:`apply_to_worker_pod` on every worker pod it returns, ``managed_redis.redis_deployment``
calls :func:`apply_to_redis_template` on the managed Redis's pod template. No API calls.

What is added never replaces what the builders set: the override models
(``rlhfspec_api.scheduling``) already refused every operator-owned env name, volume, mount
path, label, annotation and field (command, securityContext ...); here user entries are
added next to the operator's, the operator's labels written last, and the automatic
accelerator toleration kept with the user's (no duplicates).

Kueue (plain-pod integration): when the RLHFJob carries the label
``kueue.x-k8s.io/queue-name``, every worker pod gets it with the pod-group label (the job's
name) and the group's total pod count annotation, so Kueue admits the job's pods as one gang.
The count is every worker pod the operator creates (coordinator, generation replicas,
inference, trainer). The managed Redis (a Deployment's pod) is not in the group: it holds no
accelerator, and the gang waits on it otherwise.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from rlhfspec_api import API_GROUP
from rlhfspec_api.errors import FieldError
from rlhfspec_api.manifest import RLHFJob
from rlhfspec_api.scheduling import ROLES, PodOverride
from rlhfspec_operator.naming import COORDINATOR, desired_pods

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_GROUP_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
PINNED_ENV = ({"name": "RLHFSPEC_LOCAL", "value": "0"},)
"""Worker switches set explicitly on a pod with envFrom (explicit env wins over envFrom)."""


def role_override(job: RLHFJob, role: str) -> PodOverride | None:
    """The override of ``role``'s pods (its entry merged over ``default``), if any."""
    overrides = job.spec.pod_template_overrides
    return overrides.for_role(role) if overrides is not None else None


def kueue_queue(job: RLHFJob) -> str | None:
    """The Kueue LocalQueue the job is submitted to (its metadata label), if any."""
    labels: Mapping[str, Any] = job.metadata.get("labels") or {}
    queue = labels.get(KUEUE_QUEUE_LABEL)
    return str(queue) if queue else None


def gang_size(job: RLHFJob) -> int:
    """Pods in the job's Kueue pod group: every worker pod the operator creates."""
    return len(desired_pods(job.name, job.spec.generation.replicas))


def kueue_metadata(job: RLHFJob) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) that put a worker pod in the job's Kueue gang; empty without a
    queue label on the job."""
    queue = kueue_queue(job)
    if queue is None:
        return {}, {}
    labels = {KUEUE_QUEUE_LABEL: queue, KUEUE_GROUP_LABEL: job.name}
    return labels, {KUEUE_GROUP_COUNT_ANNOTATION: str(gang_size(job))}


def _add_metadata(
    meta: dict[str, Any], labels: Mapping[str, str], annotations: Mapping[str, str]
) -> None:
    # The operator's labels are written last: selectors and the pod index depend on them.
    meta["labels"] = {**labels, **meta.get("labels", {})}
    if annotations or meta.get("annotations"):
        meta["annotations"] = {**annotations, **meta.get("annotations", {})}


def _merge_tolerations(spec: dict[str, Any], extra: list[dict[str, Any]]) -> None:
    tolerations = list(spec.get("tolerations", []))
    tolerations += [t for t in extra if t not in tolerations]
    if tolerations:
        spec["tolerations"] = tolerations


def _placement(spec: dict[str, Any], wire: Mapping[str, Any]) -> None:
    """Pod-level scheduling fields: nodeSelector, affinity, priority, pull secrets."""
    for key in ("nodeSelector", "affinity", "priorityClassName"):
        if key in wire:
            spec[key] = copy.deepcopy(wire[key])
    if "imagePullSecrets" in wire:
        pulls = list(spec.get("imagePullSecrets", []))
        spec["imagePullSecrets"] = pulls + [p for p in wire["imagePullSecrets"] if p not in pulls]
    _merge_tolerations(spec, copy.deepcopy(wire.get("tolerations", [])))


def apply_to_worker_pod(pod: dict[str, Any], job: RLHFJob, role: str) -> dict[str, Any]:
    """``pod`` (a worker pod of ``role``) with the job's override and Kueue metadata added."""
    pod = copy.deepcopy(pod)
    override = role_override(job, role)
    wire = override.to_wire() if override is not None else {}
    kueue_labels, kueue_annotations = kueue_metadata(job)
    _add_metadata(
        pod["metadata"],
        {**wire.get("labels", {}), **kueue_labels},
        {**wire.get("annotations", {}), **kueue_annotations},
    )
    if not wire:
        return pod
    spec = pod["spec"]
    _placement(spec, wire)
    if "serviceAccountName" in wire:
        spec["serviceAccountName"] = wire["serviceAccountName"]
    if "volumes" in wire:
        spec["volumes"] = spec.get("volumes", []) + wire["volumes"]
    container = spec["containers"][0]
    if "env" in wire:
        container["env"] = container.get("env", []) + wire["env"]
    if "envFrom" in wire:
        container["envFrom"] = container.get("envFrom", []) + wire["envFrom"]
        # envFrom imports whatever keys its Secret or ConfigMap holds, and an explicit env var
        # wins over it: pinning the one switch the operator leaves unset keeps a key named
        # RLHFSPEC_LOCAL from turning a pod into a local-mode worker (which may read files).
        names = {var["name"] for var in container["env"]}
        container["env"] += [var for var in PINNED_ENV if var["name"] not in names]
    if "volumeMounts" in wire:
        container["volumeMounts"] = container.get("volumeMounts", []) + wire["volumeMounts"]
    return pod


def apply_to_redis_template(template: dict[str, Any], job: RLHFJob) -> dict[str, Any]:
    """The managed Redis's pod template placed like the coordinator: the coordinator entry's
    labels, annotations and scheduling fields (its env, volumes and service account are the
    coordinator worker's, not Redis's)."""
    override = role_override(job, COORDINATOR)
    if override is None:
        return template
    template = copy.deepcopy(template)
    wire = override.to_wire()
    _add_metadata(
        template.setdefault("metadata", {}), wire.get("labels", {}), wire.get("annotations", {})
    )
    _placement(template["spec"], wire)
    return template


SECRET_OPT_IN_LABEL = f"{API_GROUP}/pod-secret"
"""A Secret an override hands to a job's pods (env, envFrom, a volume) must carry this label
(value "true"): whoever labels it says any RLHFJob author of the namespace may read it.
Without the rule, creating an RLHFJob would disclose every Secret of the namespace (a
function reward runs the author's code in the pods)."""


def secret_references(job: RLHFJob) -> list[tuple[str, str, bool]]:
    """(field path, Secret name, optional) of every Secret the job's overrides hand to pods."""
    overrides = job.spec.pod_template_overrides
    if overrides is None:
        return []
    found: list[tuple[str, str, bool]] = []
    for entry in ("default", *ROLES):
        override: PodOverride | None = getattr(overrides, entry)
        if override is None:
            continue
        where = f"spec.podTemplateOverrides.{entry}"
        for i, var in enumerate(override.env or []):
            ref = var.value_from.secret_key_ref if var.value_from else None
            if ref is not None:
                found.append(
                    (f"{where}.env[{i}].valueFrom.secretKeyRef.name", ref.name, bool(ref.optional))
                )
        for i, source in enumerate(override.env_from or []):
            if source.secret_ref is not None:
                ref_from = source.secret_ref
                found.append(
                    (f"{where}.envFrom[{i}].secretRef.name", ref_from.name, bool(ref_from.optional))
                )
        for i, volume in enumerate(override.volumes or []):
            if volume.secret is not None:
                found.append(
                    (
                        f"{where}.volumes[{i}].secret.secretName",
                        volume.secret.secret_name,
                        bool(volume.secret.optional),
                    )
                )
            if volume.csi is not None and volume.csi.node_publish_secret_ref is not None:
                name = volume.csi.node_publish_secret_ref.name
                found.append((f"{where}.volumes[{i}].csi.nodePublishSecretRef.name", name, False))
    return found


def secret_reference_errors(
    job: RLHFJob, secrets: Mapping[str, Mapping[str, Any] | None]
) -> list[FieldError]:
    """Refusals of the job's override Secrets (``secrets``: each named Secret as read, None
    when missing): a Secret without the opt-in label, or a missing one not marked optional."""
    errors = []
    for field, name, optional in secret_references(job):
        secret = secrets.get(name)
        if secret is None:
            if not optional:
                errors.append(
                    FieldError(
                        field, f"Secret {name!r} not found", "an existing Secret, or optional: true"
                    )
                )
            continue
        labels = (secret.get("metadata") or {}).get("labels") or {}
        if labels.get(SECRET_OPT_IN_LABEL) != "true":
            errors.append(
                FieldError(
                    field,
                    f"Secret {name!r} does not carry the label {SECRET_OPT_IN_LABEL}=true, so the "
                    "operator will not hand it to the job's pods",
                    f"a Secret whose owner labelled it {SECRET_OPT_IN_LABEL}=true",
                )
            )
    return errors
