"""Model references and pod resources: the leaves the rest of the spec is built from.

Where it sits: used by ``spec`` (policy, reference, critic, reward) and ``generation``
(draft models, generation pod resources).
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import Field, field_validator

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

# Schemes a model location may use. ``tiny://`` names a model of the built-in tiny kit
# (``rlhfspec models build``); ``zoo://`` a pretrained model of the zoo, fetched and converted
# into the cache on first use (``rlhfspec models fetch``); ``pvc://`` a path on the job's
# storage volume; ``hf://`` and ``https://`` are fetched into the job's storage before the
# workers start (``rlhfspec_workers.fetch``).
MODEL_URI_SCHEMES = ("tiny", "zoo", "hf", "https", "pvc", "file")
FETCHED_SCHEMES = ("hf", "https")
"""Remote locations (models and datasets) a job's fetch step downloads into its storage."""
UNSUPPORTED_SCHEMES = ("s3", "gs")
"""Object stores the worker image has no client for: refused with their own message."""
FETCHED_ALLOWED = (
    "hf://ORG/NAME[@REVISION][/PATH], https://HOST/FILE (a file, or a .tar, .tar.gz, .tgz or "
    ".zip archive of a model directory), or pvc:// after copying it into the job's storage"
)
DATASET_URI_SCHEMES = ("tiny", "hf", "https", "pvc", "file")
"""Schemes a dataset location (``spec.dataset.path`` and ``eval``) may use."""
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


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
            f"{scheme}:// ({echo(value)}) is not supported: the worker image has no "
            "object-store client",
            FETCHED_ALLOWED,
        )
    allowed = "a path, or a URI " + ", ".join(s + "://..." for s in DATASET_URI_SCHEMES)
    if scheme not in DATASET_URI_SCHEMES:
        raise value_error(f"unknown scheme {echo(scheme)} in {echo(value)}", allowed)
    repo_problem = hf_repo_problem(rest) if scheme == "hf" else None
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
                f"{scheme}:// ({echo(value)}) is not supported: the worker image has no "
                "object-store client",
                FETCHED_ALLOWED,
            )
        if scheme not in MODEL_URI_SCHEMES:
            raise value_error(f"unknown scheme {echo(scheme)} in {echo(value)}", allowed)
        if not rest:
            raise value_error(f"{echo(value)} names no model after {scheme}://", allowed)
        repo_problem = hf_repo_problem(rest) if scheme == "hf" else None
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


class FetchCredentials(ContractModel):
    """Secrets the fetch step reads (as environment variables of its init container only);
    the operator's own environment is never used."""

    hf_token: CredentialRef | None = None
    """Hugging Face access token (``HF_TOKEN``) for gated or private hf:// repositories."""
