"""Model references and pod resources: the leaves the rest of the spec is built from.

Where it sits: used by ``spec`` (policy, reference, critic, reward) and ``generation``
(draft models, generation pod resources).
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import Field, field_validator

from rlhfspec_api.base import ContractModel, Int, PathText, Quantity, value_error
from rlhfspec_api.echo import echo

# Schemes a model location may use. ``tiny://`` names a model of the built-in tiny kit
# (``rlhfspec models build``); ``zoo://`` a pretrained model of the zoo, fetched and converted
# into the cache on first use (``rlhfspec models fetch``); ``pvc://`` a path on the job's
# storage volume.
MODEL_URI_SCHEMES = ("tiny", "zoo", "hf", "s3", "gs", "pvc", "file")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


class DType(StrEnum):
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class ModelRef(ContractModel):
    """Where a model's HF-format weights live."""

    path: PathText
    """A filesystem path, or a URI with scheme tiny, zoo, hf, s3, gs, pvc or file
    (e.g. ``tiny://policy``, ``zoo://smollm2-135m-instruct``, ``hf://org/name``,
    ``pvc://models/policy``)."""
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
        if scheme not in MODEL_URI_SCHEMES:
            raise value_error(f"unknown scheme {echo(scheme)} in {echo(value)}", allowed)
        if not rest:
            raise value_error(f"{echo(value)} names no model after {scheme}://", allowed)
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
