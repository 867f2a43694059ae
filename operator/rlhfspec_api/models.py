"""Model references and pod resources: the leaves the rest of the spec is built from.

Where it sits: used by ``spec`` (policy, reference, critic, reward) and ``generation``
(draft models, generation pod resources).
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from rlhfspec_api.base import (
    ContractModel,
    DnsSubdomain,
    Int,
    PathText,
    Quantity,
    SecretKey,
    value_error,
)
from rlhfspec_api.echo import echo
from rlhfspec_api.rules import Violation, raise_if_any

# Schemes a model location may use. ``tiny://`` names a model of the built-in tiny kit
# (``rlhfspec models build``); ``zoo://`` a pretrained model of the zoo, fetched and converted
# into the cache on first use (``rlhfspec models fetch``); ``pvc://`` a path on the job's
# storage volume; ``hf://``, ``https://`` and ``s3://`` are fetched into the job's storage
# before the workers start (``rlhfspec_workers.fetch``).
MODEL_URI_SCHEMES = ("tiny", "zoo", "hf", "https", "s3", "pvc", "file")
FETCHED_SCHEMES = ("hf", "https", "s3")
"""Remote locations (models and datasets) a job's fetch step downloads into its storage."""
UNSUPPORTED_SCHEMES = ("gs",)
"""Refused with their own message: GCS is reached through its S3-compatible endpoint."""
FETCHED_ALLOWED = (
    "hf://ORG/NAME[@REVISION][/PATH], https://HOST/FILE (a file, or a .tar, .tar.gz, .tgz or "
    ".zip archive of a model directory), s3://BUCKET/KEY (an object, or the objects under "
    "KEY/; GCS through spec.credentials.s3.endpoint https://storage.googleapis.com with HMAC "
    "keys), or pvc:// after copying it into the job's storage"
)
DATASET_URI_SCHEMES = ("tiny", "hf", "https", "s3", "pvc", "file")
"""Schemes a dataset location (``spec.dataset.path`` and ``eval``) may use."""
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


def remote_problem(scheme: str, rest: str) -> str | None:
    """What is wrong with a fetched location's part after ``scheme://``; None when fine."""
    if scheme == "hf":
        return hf_repo_problem(rest)
    if scheme == "s3" and not rest.partition("/")[0]:
        return "names no bucket"
    return None


def hf_repo_problem(rest: str) -> str | None:
    """What is wrong with the part after ``hf://`` (``[datasets/]ORG/NAME[@REV][/PATH]``);
    None when it names a repository."""
    parts = rest.split("/")
    if parts[0] == "datasets":
        parts = parts[1:]
    if len(parts) < 2 or not parts[0] or not parts[1].partition("@")[0]:
        return "names no repository ORG/NAME"
    if parts[1].endswith("@"):
        return "has an empty revision after '@'"
    if any(part in ("", ".", "..") for part in parts[2:]):
        return "has an empty, '.' or '..' path segment"
    return None


def check_dataset_location(value: str) -> str:
    """A dataset file's path or URI, refused (naming what is allowed) when its scheme is
    unknown, an object store, or an hf:// URI naming no repository."""
    match = _SCHEME.match(value)
    if match is None:
        return value
    scheme, rest = match.group(1), match.group(2)
    if scheme in UNSUPPORTED_SCHEMES:
        raise value_error(
            f"{scheme}:// ({echo(value)}) is not supported: the worker image has no GCS client",
            FETCHED_ALLOWED,
        )
    allowed = "a path, or a URI " + ", ".join(s + "://..." for s in DATASET_URI_SCHEMES)
    if scheme not in DATASET_URI_SCHEMES:
        raise value_error(f"unknown scheme {echo(scheme)} in {echo(value)}", allowed)
    repo_problem = remote_problem(scheme, rest)
    if repo_problem is not None:
        raise value_error(f"{echo(value)}: {repo_problem}", FETCHED_ALLOWED)
    return value


class DType(StrEnum):
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class ModelRef(ContractModel):
    """Where a model's HF-format weights live."""

    path: PathText
    """A filesystem path, or a URI with scheme tiny, zoo, hf, https, pvc or file
    (e.g. ``tiny://policy``, ``zoo://smollm2-135m-instruct``, ``hf://org/name@revision``,
    ``https://host/model.tar.gz``, ``pvc://models/policy``). hf and https models are
    downloaded into the job's storage before the workers start."""
    dtype: DType = DType.BFLOAT16
    """Weight and compute dtype."""

    @field_validator("path")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        match = _SCHEME.match(value)
        if match is None:
            return value
        scheme, rest = match.group(1), match.group(2)
        allowed = "a path, or a URI " + ", ".join(s + "://..." for s in MODEL_URI_SCHEMES)
        if scheme in UNSUPPORTED_SCHEMES:
            raise value_error(
                f"{scheme}:// ({echo(value)}) is not supported: the worker image has no GCS client",
                FETCHED_ALLOWED,
            )
        if scheme not in MODEL_URI_SCHEMES:
            raise value_error(f"unknown scheme {echo(scheme)} in {echo(value)}", allowed)
        if not rest:
            raise value_error(f"{echo(value)} names no model after {scheme}://", allowed)
        repo_problem = remote_problem(scheme, rest)
        if repo_problem is not None:
            raise value_error(f"{echo(value)}: {repo_problem}", FETCHED_ALLOWED)
        return value

    @property
    def scheme(self) -> str | None:
        """The URI scheme, or None for a plain path."""
        match = _SCHEME.match(self.path)
        return match.group(1) if match else None


class Resources(ContractModel):
    """Compute resources of one pod (requests; limits equal requests)."""

    cpu: Quantity = "1"
    """CPU cores, e.g. 2 or 500m."""
    memory: Quantity = "4Gi"
    """Memory, e.g. 16Gi."""
    gpu: Int = Field(default=0, ge=0, le=64)
    """Accelerators per pod; 0 runs on CPU."""
    gpu_resource_name: str = Field(default="nvidia.com/gpu", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    """Extended resource name of the accelerator."""


class CredentialRef(ContractModel):
    """A key of a Secret in the job's namespace holding a credential. Both name and key are
    required: a credential never falls back to a default key."""

    name: DnsSubdomain
    """Secret name."""
    key: SecretKey
    """Key inside the Secret."""


class S3Access(ContractModel):
    """How the fetch step reaches ``s3://`` locations: AWS, or an S3-compatible store."""

    endpoint: str | None = Field(
        default=None, max_length=2048, pattern=r"^https?://[A-Za-z0-9.\-\[\]:]+(/[^\s]*)?$"
    )
    """An S3-compatible store's URL, addressed path-style (e.g. ``http://minio.infra:9000``,
    ``https://storage.googleapis.com``); default: AWS in ``region``."""
    region: str = Field(default="us-east-1", max_length=64, pattern=r"^[a-z0-9-]+$")
    """The region requests are signed for (``auto`` for GCS)."""
    access_key_id: CredentialRef | None = None
    """Access key ID; with ``secretAccessKey``, requests are signed (else sent unsigned)."""
    secret_access_key: CredentialRef | None = None
    """Secret access key."""

    @model_validator(mode="after")
    def _both_keys(self) -> S3Access:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            missing = "secretAccessKey" if self.secret_access_key is None else "accessKeyId"
            raise_if_any(
                [
                    Violation(
                        missing,
                        "one of the two S3 keys is named without the other",
                        "both accessKeyId and secretAccessKey, or neither (a public bucket)",
                    )
                ]
            )
        return self


class FetchCredentials(ContractModel):
    """Secrets the fetch step reads (as environment variables of its init container only);
    the operator's own environment is never used."""

    hf_token: CredentialRef | None = None
    """Hugging Face access token (``HF_TOKEN``) for gated or private hf:// repositories."""
    s3: S3Access | None = None
    """Endpoint, region and keys for s3:// locations."""
