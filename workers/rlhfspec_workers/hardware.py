"""What the machine computes natively, and the engine dtype that follows from it.

Where it sits: the one place that turns ``generation.dtype: auto`` into a concrete dtype. The
generation worker, ``rlhfspec generate``, the benchmarks and the tests all call
:func:`resolve_engine_dtype`, so "auto" means the same thing everywhere.

The rule: bfloat16 where the hardware multiplies bf16 natively (a CUDA device with bf16
support; a CPU with AVX512-BF16 or AMX-BF16), float32 elsewhere. On an AVX2-only CPU bf16 is
emulated (converted to fp32 around every matmul), which is slower than fp32 and rounds worse.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from rlhfspec_api.generation import EngineDType

NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""/proc/cpuinfo flags that mean the CPU has bf16 dot-product instructions."""


@cache
def _cpuinfo_field(*names: str) -> str | None:
    """The first CPU's value of the first /proc/cpuinfo field starting with one of names."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(names):
            return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return frozenset((_cpuinfo_field("flags", "Features") or "").split())


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def native_bf16(device: str) -> bool:
    """Whether ``device`` ("cpu", "cuda", "cuda:N") computes bf16 natively."""
    if device.startswith("cuda"):
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)


def resolve_engine_dtype(dtype: EngineDType | str, device: str | None = None) -> str:
    """A concrete vLLM dtype name for ``dtype`` on ``device`` (default: CUDA if present)."""
    value = EngineDType(dtype)
    if value is not EngineDType.AUTO:
        return value.value
    device = device or ("cuda" if cuda_available() else "cpu")
    return EngineDType.BFLOAT16.value if native_bf16(device) else EngineDType.FLOAT32.value


def cpu_model() -> str:
    """The first CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    return _cpuinfo_field("model name") or "unknown CPU"


def describe_machine() -> str:
    """One line for logs and benchmark output: the CPU (model, cores this process may use,
    AMX or not), the device, and native bf16 or not. Results differ between CPU kinds, so a
    benchmark's JSON says which one measured it."""
    device = "cuda" if cuda_available() else "cpu"
    amx = "amx" if "amx_bf16" in cpu_flags() else "no amx"
    cpu = f"{cpu_model()}, {available_cores()} cores, {amx}"
    return f"{cpu}; {device}, native bf16: {'yes' if native_bf16(device) else 'no'}"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; torch's default thread count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1
