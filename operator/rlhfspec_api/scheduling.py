"""Per-role pod template overrides (``spec.podTemplateOverrides``) and what they may not touch.

Where it sits: a field of ``spec.RLHFJobSpec``, parsed with the rest of the spec (CLI
``validate``, local mode, the operator); the operator's ``overrides`` module merges
:meth:`PodTemplateOverrides.for_role` into the pods the builders produce. Local mode runs no
pods and ignores it.

A user may set what a platform needs to place and feed a pod (nodeSelector, tolerations,
affinity, priorityClassName, imagePullSecrets, serviceAccountName, env/envFrom, volumes and
volumeMounts, labels and annotations), once for every role (``default``) and per role. What
the operator owns is refused here, at validate time, with the field named: the container
command and args, any security context, the worker env contract (``RLHFSPEC_*``, ``HOME``,
``PYTHONPATH``), the volumes and mount paths of the worker contract, the operator's and
Kueue's labels. A refused override never reaches a pod, so a user value can neither disable
the security context nor replace the worker contract.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, WithJsonSchema, model_validator

from rlhfspec_api import API_GROUP, formats
from rlhfspec_api.affinity import Affinity, AnnotationMap, LabelMap
from rlhfspec_api.base import ContractModel, DnsSubdomain
from rlhfspec_api.echo import echo
from rlhfspec_api.pod_fields import (
    MAX_ITEMS,
    EnvFromSource,
    EnvVar,
    PullSecretRef,
    Toleration,
    Volume,
    VolumeMount,
)
from rlhfspec_api.rules import Violation, raise_if_any

ROLES = ("coordinator", "generation", "inference", "trainer")
"""The worker roles an override may name (the operator's pod roles)."""

RESERVED_ENV_PREFIX = "RLHFSPEC_"
RESERVED_ENV_NAMES = frozenset({"HOME", "PYTHONPATH"})
"""The worker env contract (``builders.worker_env``): the operator's, never a user's."""
RESERVED_VOLUMES = frozenset({"config", "storage", "tmp", "dshm", "redis-ca"})
RESERVED_VOLUME_PREFIX = "reward-modules-"
RESERVED_MOUNT_PATHS = (
    "/etc/rlhfspec",
    "/data",
    "/tmp",
    "/dev/shm",
    "/etc/rlhfspec-rewards",
    "/etc/rlhfspec-redis-ca",
)
"""Where the operator mounts the job config, storage, scratch and CAs; a user mount may not
be one of them, inside one or above one."""
KUEUE_PREFIX = "kueue.x-k8s.io/"
RESERVED_LABEL_PREFIXES = (f"{API_GROUP}/", KUEUE_PREFIX)
RESERVED_LABELS = frozenset(
    f"app.kubernetes.io/{name}"
    for name in ("name", "instance", "component", "part-of", "managed-by")
)
RESERVED_ANNOTATION_PREFIXES = (
    f"{API_GROUP}/",
    KUEUE_PREFIX,
    # Annotation forms of a container's AppArmor and seccomp profiles: security context.
    "container.apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/",
)
OWNED_FIELDS = {
    "command": "the container command (rlhfspec worker <role>)",
    "args": "the container command (rlhfspec worker <role>)",
    "securityContext": "the pod's and container's security context (non-root, read-only root)",
    "image": "the image (spec.image)",
    "resources": "resources (spec.<stage>.resources)",
    "containers": "the worker container",
    "initContainers": "the pod's containers",
    "restartPolicy": "restarts (it recreates failed pods, counting spec.backoffLimit)",
    "automountServiceAccountToken": "the service account token (workers get none)",
    "hostNetwork": "host namespaces (never shared)",
    "hostPID": "host namespaces (never shared)",
    "hostIPC": "host namespaces (never shared)",
    "hostname": "pod DNS names",
    "subdomain": "pod DNS names",
}
"""Fields users coming from pod templates try to set, and why they cannot."""
OVERRIDE_ALLOWED = (
    "labels, annotations, nodeSelector, tolerations, affinity, priorityClassName, "
    "serviceAccountName, imagePullSecrets, env, envFrom, volumes, volumeMounts"
)


class PodOverride(ContractModel):
    """What is added to the pods of a role (or of every role, for ``default``)."""

    labels: LabelMap | None = None
    """Extra pod labels (not rlhfspec.io/*, kueue.x-k8s.io/* or the app.kubernetes.io/* ones
    the operator sets)."""
    annotations: AnnotationMap | None = None
    """Extra pod annotations (not rlhfspec.io/*, kueue.x-k8s.io/*, AppArmor or seccomp)."""
    node_selector: LabelMap | None = None
    """Node labels the pods need."""
    tolerations: list[Toleration] | None = Field(default=None, max_length=MAX_ITEMS)
    """Taints tolerated, in addition to the automatic accelerator toleration."""
    affinity: Affinity | None = None
    """Node and pod (anti-)affinity."""
    priority_class_name: DnsSubdomain | None = None
    """The pods' PriorityClass."""
    service_account_name: DnsSubdomain | None = None
    """Service account of the pods (e.g. for cloud workload identity); its token is still not
    mounted, since workers never call the Kubernetes API."""
    image_pull_secrets: list[PullSecretRef] | None = Field(default=None, max_length=MAX_ITEMS)
    """Secrets to pull the worker image with."""
    env: list[EnvVar] | None = Field(default=None, max_length=256)
    """Extra env vars of the worker container, e.g. HF_TOKEN from a Secret."""
    env_from: list[EnvFromSource] | None = Field(default=None, max_length=MAX_ITEMS)
    """Every key of a Secret or ConfigMap as env vars."""
    volumes: list[Volume] | None = Field(default=None, max_length=MAX_ITEMS)
    """Extra volumes."""
    volume_mounts: list[VolumeMount] | None = Field(default=None, max_length=MAX_ITEMS)
    """Where the worker container mounts them."""

    @model_validator(mode="before")
    @classmethod
    def _no_owned_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            raise_if_any(
                [
                    Violation(
                        str(key),
                        f"the operator owns {OWNED_FIELDS[key]}",
                        f"remove it; an override may set {OVERRIDE_ALLOWED}",
                    )
                    for key in data
                    if key in OWNED_FIELDS
                ]
            )
        return data

    @model_validator(mode="after")
    def _not_operator_owned(self) -> PodOverride:
        violations = _map_violations("labels", self.labels, _reserved_label)
        violations += _map_violations("annotations", self.annotations, _reserved_annotation)
        violations += _duplicates("env", [e.name for e in self.env or []], "name")
        for index, var in enumerate(self.env or []):
            if var.name.startswith(RESERVED_ENV_PREFIX) or var.name in RESERVED_ENV_NAMES:
                violations.append(
                    Violation(
                        f"env[{index}].name",
                        f"{echo(var.name)} is the operator's (the worker env contract)",
                        "a name not starting with RLHFSPEC_ and not HOME or PYTHONPATH",
                    )
                )
        for index, source in enumerate(self.env_from or []):
            if (source.prefix or "").upper().startswith(RESERVED_ENV_PREFIX):
                violations.append(
                    Violation(
                        f"envFrom[{index}].prefix",
                        f"{echo(source.prefix)} would name variables of the worker contract",
                        "a prefix not starting with RLHFSPEC_",
                    )
                )
        violations += _duplicates("volumes", [v.name for v in self.volumes or []], "name")
        for index, volume in enumerate(self.volumes or []):
            if volume.name in RESERVED_VOLUMES or volume.name.startswith(RESERVED_VOLUME_PREFIX):
                violations.append(
                    Violation(
                        f"volumes[{index}].name",
                        f"{echo(volume.name)} is a volume of the operator's",
                        "a name other than config, storage, tmp, dshm, redis-ca, reward-modules-*",
                    )
                )
        mounts = self.volume_mounts or []
        paths = [_normal(m.mount_path) for m in mounts]
        violations += _duplicates("volumeMounts", paths, "mountPath")
        for index, mount in enumerate(mounts):
            problem = mount_path_problem(mount.mount_path)
            if problem is not None:
                violations.append(
                    Violation(
                        f"volumeMounts[{index}].mountPath",
                        f"{echo(mount.mount_path)} {problem}",
                        "an absolute path outside " + ", ".join(RESERVED_MOUNT_PATHS),
                    )
                )
        raise_if_any(violations)
        return self


def _crd_schema(model: type[ContractModel]) -> dict[str, Any]:
    """A compact CRD schema of an override: its fields typed one level deep, their contents
    kept as written. Fully typed, the five entries took 220 KB of the CRD (past what a
    client-side ``kubectl apply`` can store); the parser checks every nested field anyway, at
    ``rlhfspec validate`` and as the operator's ValidationFailed condition."""
    maps = {"labels", "annotations", "nodeSelector"}
    properties: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        alias = info.alias or name
        node: dict[str, Any]
        if alias in maps:
            node = {"type": "object", "additionalProperties": {"type": "string"}}
        elif alias in ("priorityClassName", "serviceAccountName"):
            node = {"type": "string"}
        elif alias == "affinity":
            node = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        else:
            item = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            node = {"type": "array", "items": item}
        properties[alias] = {**node, "description": info.description or ""}
    return {"type": "object", "description": model.__doc__ or "", "properties": properties}


Override = Annotated[PodOverride, WithJsonSchema(_crd_schema(PodOverride))]


class PodTemplateOverrides(ContractModel):
    """Additions to the job's pods, for every role (default) and per role. A role's entry is
    merged over default: its labels, annotations and nodeSelector entries win per key; its
    env vars, volumes and mounts replace default's of the same name (mount path); lists
    (tolerations, envFrom, imagePullSecrets) add up; affinity, priorityClassName and
    serviceAccountName replace default's. The coordinator's entry also places the managed
    Redis (nodeSelector, tolerations, affinity, priorityClassName, imagePullSecrets, labels,
    annotations)."""

    default: Override | None = None
    """Applied to the pods of every role."""
    coordinator: Override | None = None
    """The coordinator pod (and the managed Redis's placement)."""
    generation: Override | None = None
    """The generation pods."""
    inference: Override | None = None
    """The inference pod."""
    trainer: Override | None = None
    """The trainer pod."""

    @model_validator(mode="after")
    def _mounts_name_volumes(self) -> PodTemplateOverrides:
        violations: list[Violation] = []
        default_volumes = {v.name for v in (self.default.volumes if self.default else None) or []}
        for entry in ("default", *ROLES):
            override: PodOverride | None = getattr(self, entry)
            if override is None:
                continue
            known = {v.name for v in override.volumes or []} | default_volumes
            for index, mount in enumerate(override.volume_mounts or []):
                if mount.name not in known:
                    where = "default" if entry == "default" else f"default or {entry}"
                    violations.append(
                        Violation(
                            f"{entry}.volumeMounts[{index}].name",
                            f"{echo(mount.name)} names no volume of {where}",
                            "the name of a volume in the same override or in default",
                        )
                    )
        raise_if_any(violations)
        return self

    def for_role(self, role: str) -> PodOverride | None:
        """The override of ``role``'s pods: its own entry merged over ``default``."""
        return merged(self.default, getattr(self, role))


def merged(base: PodOverride | None, top: PodOverride | None) -> PodOverride | None:
    """``top`` merged over ``base`` (see :class:`PodTemplateOverrides`)."""
    if base is None or top is None:
        return top or base
    out = base.model_copy(deep=True)
    for name in ("labels", "annotations", "node_selector"):
        if getattr(top, name) is not None:
            setattr(out, name, {**(getattr(base, name) or {}), **getattr(top, name)})
    for name in ("affinity", "priority_class_name", "service_account_name"):
        if getattr(top, name) is not None:
            setattr(out, name, getattr(top, name))
    for name in ("tolerations", "env_from", "image_pull_secrets"):
        if getattr(top, name) is not None:
            items = [*(getattr(base, name) or []), *getattr(top, name)]
            setattr(out, name, [i for n, i in enumerate(items) if i not in items[:n]])
    if top.env is not None:
        out.env = _replace_by(base.env, top.env, lambda v: v.name)
    if top.volumes is not None:
        out.volumes = _replace_by(base.volumes, top.volumes, lambda v: v.name)
    if top.volume_mounts is not None:
        out.volume_mounts = _replace_by(
            base.volume_mounts, top.volume_mounts, lambda m: _normal(m.mount_path)
        )
    return out


def _replace_by(base: list[Any] | None, top: list[Any], key: Any) -> list[Any]:
    replaced = {key(item) for item in top}
    return [item for item in base or [] if key(item) not in replaced] + list(top)


def _normal(path: str) -> str:
    return "/" + "/".join(p for p in path.split("/") if p)


def mount_path_problem(path: str) -> str | None:
    """None when a user volume may be mounted at ``path``; otherwise what is wrong."""
    if not path.startswith("/"):
        return "is not an absolute path"
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts) or formats.control_characters(path):
        return "has '.' or '..' components or control characters"
    normal = _normal(path)
    if normal == "/":
        return "would cover the whole filesystem"
    for owned in RESERVED_MOUNT_PATHS:
        if normal == owned or normal.startswith(owned + "/") or owned.startswith(normal + "/"):
            return f"overlaps {owned}, which the operator mounts"
    return None


def _reserved_label(key: str) -> bool:
    return key.startswith(RESERVED_LABEL_PREFIXES) or key in RESERVED_LABELS


def _reserved_annotation(key: str) -> bool:
    return key.startswith(RESERVED_ANNOTATION_PREFIXES)


def _map_violations(field: str, values: dict[str, str] | None, reserved: Any) -> list[Violation]:
    return [
        Violation(
            f"{field}.{key}",
            f"{echo(key)} is set by the operator (the job's identity, Kueue's gang metadata "
            "or the security context)",
            "another key; a Kueue queue is set with the label kueue.x-k8s.io/queue-name on "
            "the RLHFJob itself",
        )
        for key in values or {}
        if reserved(key)
    ]


def _duplicates(field: str, keys: list[str], what: str) -> list[Violation]:
    seen: set[str] = set()
    out = []
    for index, key in enumerate(keys):
        if key in seen:
            out.append(
                Violation(
                    f"{field}[{index}].{what}", f"{echo(key)} appears twice", f"each {what} once"
                )
            )
        seen.add(key)
    return out
