"""Kubernetes pod field types an override may carry: env, envFrom, volumes, mounts, tolerations.

Where it sits: used by ``scheduling`` (the ``podTemplateOverrides`` models). Each mirrors the
Kubernetes API's shape of the same name, restricted to what a worker pod may take: volume
sources are ConfigMaps, Secrets, existing claims, emptyDirs and CSI ephemeral volumes (no
hostPath), env values come from literals, Secret or ConfigMap keys or the downward API. The
rules on names the operator owns live in ``scheduling``; here only shapes and formats.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, Field, Strict, model_validator

from rlhfspec_api import formats
from rlhfspec_api.base import (
    Bool,
    ContractModel,
    DnsSubdomain,
    Int,
    PlainText,
    Quantity,
    SecretKey,
    value_error,
)
from rlhfspec_api.echo import echo
from rlhfspec_api.rules import Violation, raise_if_any

_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_FIELD_PATH = re.compile(
    r"metadata\.(name|namespace|uid)|metadata\.(labels|annotations)\['[^']+'\]"
    r"|spec\.(nodeName|serviceAccountName)|status\.(hostIP|hostIPs|podIP|podIPs)"
)
MAX_ITEMS = 64


def _env_name(value: str) -> str:
    if len(value) > 253 or not _ENV_NAME.fullmatch(value):
        raise value_error(
            f"{echo(value)} is not a valid environment variable name",
            "letters, digits, '_', '-' and '.', not starting with a digit",
        )
    return value


def _field_path(value: str) -> str:
    if not _FIELD_PATH.fullmatch(value):
        raise value_error(
            f"{echo(value)} is not a pod field the downward API exposes",
            "metadata.name, metadata.namespace, metadata.uid, metadata.labels['k'], "
            "metadata.annotations['k'], spec.nodeName, spec.serviceAccountName, "
            "status.hostIP(s), status.podIP(s)",
        )
    return value


def _dns_label(value: str) -> str:
    if formats.dns_label(value) is not None:
        raise value_error(
            f"{echo(value)} is not a valid volume name",
            "a DNS-1123 label: at most 63 lowercase letters, digits and '-'",
        )
    return value


EnvName = Annotated[str, Strict(), AfterValidator(_env_name)]
VolumeName = Annotated[str, Strict(), AfterValidator(_dns_label)]
EnvValue = Annotated[str, Strict(), Field(max_length=32768)]


class KeySelector(ContractModel):
    """A key of a Secret or ConfigMap in the job's namespace."""

    name: DnsSubdomain
    """The Secret or ConfigMap."""
    key: SecretKey | None = None
    """The key to read (required)."""
    optional: Bool | None = None
    """true: start the pod even when the object or key is missing."""

    @model_validator(mode="after")
    def _key_given(self) -> KeySelector:
        if self.key is None:
            raise_if_any(
                [
                    Violation(
                        "key",
                        "is missing: a reference names the key of the Secret or ConfigMap",
                        "the key to read, e.g. token",
                    )
                ]
            )
        return self


class FieldSelector(ContractModel):
    """A field of the pod itself (the downward API)."""

    field_path: Annotated[PlainText, AfterValidator(_field_path)]
    """e.g. spec.nodeName or metadata.labels['team']."""
    api_version: PlainText | None = None
    """Version of the schema the path is written in (v1)."""


class EnvVarSource(ContractModel):
    """Where an env var's value comes from: exactly one source."""

    secret_key_ref: KeySelector | None = None
    """A key of a Secret, e.g. HF_TOKEN from {name: hf, key: token}."""
    config_map_key_ref: KeySelector | None = None
    """A key of a ConfigMap."""
    field_ref: FieldSelector | None = None
    """A field of the pod."""

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        _exactly_one(self, ("secret_key_ref", "config_map_key_ref", "field_ref"))
        return self


class EnvVar(ContractModel):
    """An extra environment variable of the worker container."""

    name: EnvName
    """The variable's name (not RLHFSPEC_*, HOME or PYTHONPATH: the worker contract's)."""
    value: EnvValue | None = None
    """A literal value."""
    value_from: EnvVarSource | None = None
    """Or a value read from a Secret, a ConfigMap or the pod."""

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise_if_any(
                [Violation("valueFrom", "both value and valueFrom are set", "one of them")]
            )
        return self


class ObjectRef(ContractModel):
    """An object of the job's namespace, by name."""

    name: DnsSubdomain
    """Its name."""
    optional: Bool | None = None
    """true: start the pod even when it is missing (envFrom only)."""


class PullSecretRef(ContractModel):
    """An image pull Secret of the job's namespace."""

    name: DnsSubdomain
    """The Secret (type kubernetes.io/dockerconfigjson)."""


class EnvFromSource(ContractModel):
    """Every key of a Secret or ConfigMap as env vars: exactly one source. Variables the
    operator sets explicitly win over these (Kubernetes gives env precedence over envFrom)."""

    prefix: Annotated[str, Strict(), Field(max_length=253)] | None = None
    """Prepended to every key (not starting with RLHFSPEC_)."""
    secret_ref: ObjectRef | None = None
    """The Secret."""
    config_map_ref: ObjectRef | None = None
    """The ConfigMap."""

    @model_validator(mode="after")
    def _one_source(self) -> EnvFromSource:
        _exactly_one(self, ("secret_ref", "config_map_ref"))
        return self


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ContractModel):
    """A taint the pods tolerate (added to the operator's automatic GPU toleration)."""

    key: PlainText | None = None
    """Taint key; empty with operator Exists tolerates every taint."""
    operator: TolerationOperator | None = None
    """Equal (default) or Exists."""
    value: Annotated[str, Strict(), Field(max_length=63)] | None = None
    """Taint value (Equal only)."""
    effect: TaintEffect | None = None
    """NoSchedule, PreferNoSchedule or NoExecute; empty matches all."""
    toleration_seconds: Int | None = Field(default=None, ge=0, le=2**31 - 1)
    """NoExecute: how long the pod stays bound after the taint appears."""

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        violations = []
        if self.operator is TolerationOperator.EXISTS and self.value:
            violations.append(Violation("value", "Exists takes no value", "remove value"))
        if not self.key and self.operator is not TolerationOperator.EXISTS:
            violations.append(
                Violation("operator", "an empty key needs operator Exists", "Exists, or set key")
            )
        raise_if_any(violations)
        return self


class KeyToPath(ContractModel):
    """One key of a Secret or ConfigMap projected to a file."""

    key: SecretKey
    """The key."""
    path: Annotated[PlainText, AfterValidator(lambda p: _relative_path(p, "path"))]
    """Relative file path inside the volume."""


_MODE = Field(default=None, ge=0, le=0o777)


class ConfigMapVolume(ContractModel):
    """A ConfigMap's keys as files."""

    name: DnsSubdomain
    """The ConfigMap."""
    items: list[KeyToPath] | None = Field(default=None, max_length=MAX_ITEMS)
    """Only these keys, at these paths (default: every key, at its name)."""
    default_mode: Int | None = _MODE
    """File mode bits (decimal in JSON, e.g. 420 for 0644)."""
    optional: Bool | None = None
    """true: start the pod even when the ConfigMap is missing."""


class SecretVolume(ContractModel):
    """A Secret's keys as files."""

    secret_name: DnsSubdomain
    """The Secret."""
    items: list[KeyToPath] | None = Field(default=None, max_length=MAX_ITEMS)
    """Only these keys, at these paths (default: every key, at its name)."""
    default_mode: Int | None = _MODE
    """File mode bits (decimal in JSON, e.g. 256 for 0400)."""
    optional: Bool | None = None
    """true: start the pod even when the Secret is missing."""


class ClaimVolume(ContractModel):
    """An existing PersistentVolumeClaim (e.g. a shared model cache)."""

    claim_name: DnsSubdomain
    """The claim."""
    read_only: Bool | None = None
    """Mount it read-only."""


class EmptyDirMedium(StrEnum):
    DISK = ""
    MEMORY = "Memory"


class EmptyDirVolume(ContractModel):
    """Scratch space that lives as long as the pod."""

    medium: EmptyDirMedium | None = None
    """"" (node disk) or Memory."""
    size_limit: Quantity | None = None
    """At most this much, e.g. 10Gi."""


class CsiVolume(ContractModel):
    """A CSI driver's ephemeral volume (e.g. an object-store or secrets-store driver)."""

    driver: DnsSubdomain
    """The driver's name."""
    read_only: Bool | None = None
    """Mount it read-only."""
    fs_type: PlainText | None = None
    """Filesystem type, if the driver needs one."""
    volume_attributes: Annotated[dict[str, str], Field(max_length=MAX_ITEMS)] | None = None
    """Driver-specific settings."""
    node_publish_secret_ref: PullSecretRef | None = None
    """A Secret the driver reads."""


_SOURCES = ("config_map", "secret", "persistent_volume_claim", "empty_dir", "csi")


class Volume(ContractModel):
    """An extra volume of the pod: exactly one source."""

    name: VolumeName
    """Its name, used by volumeMounts (not one of the operator's: config, storage, tmp,
    dshm, redis-ca, reward-modules-*)."""
    config_map: ConfigMapVolume | None = None
    """A ConfigMap."""
    secret: SecretVolume | None = None
    """A Secret."""
    persistent_volume_claim: ClaimVolume | None = None
    """An existing claim."""
    empty_dir: EmptyDirVolume | None = None
    """Pod-lifetime scratch space."""
    csi: CsiVolume | None = None
    """A CSI ephemeral volume."""

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        _exactly_one(self, _SOURCES)
        return self


SubPath = Annotated[PlainText, AfterValidator(lambda p: _relative_path(p, "subPath"))]


class VolumeMount(ContractModel):
    """Where the worker container mounts one of the override's volumes."""

    name: VolumeName
    """A volume of this override (or of default)."""
    mount_path: Annotated[str, Strict(), Field(min_length=1, max_length=4096)]
    """Absolute path; not /etc/rlhfspec, /data, /tmp, /dev/shm or their parents or children."""
    read_only: Bool | None = None
    """Mount it read-only."""
    sub_path: SubPath | None = None
    """Mount only this relative path of the volume."""


def _exactly_one(model: ContractModel, names: Iterable[str]) -> None:
    names = list(names)
    aliases = {n: type(model).model_fields[n].alias or n for n in names}
    chosen = [aliases[n] for n in names if getattr(model, n) is not None]
    if len(chosen) != 1:
        got = ", ".join(chosen) if chosen else "none"
        raise_if_any(
            [
                Violation(
                    "",
                    f"exactly one source is needed, got {got}",
                    "one of " + ", ".join(aliases.values()),
                )
            ]
        )


def _relative_path(value: str, field: str) -> str:
    parts = value.split("/")
    if value.startswith("/") or ".." in parts:
        raise value_error(
            f"{echo(value)} leaves the volume", f"a relative {field} without '..' components"
        )
    return value
