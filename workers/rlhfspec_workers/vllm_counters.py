"""One vLLM engine's own speculative-decoding counters, whatever else runs in the process.

Where it sits: ``GenerationEngine.counters()`` (which the worker's ``/metrics`` re-exports) and
the tiny kit's ``spec_counters`` read vLLM's cumulative spec-decode counters here.

Why not ``LLMEngine.get_metrics()``: it snapshots prometheus_client's process-wide registry,
and every new engine's Prometheus logger first unregisters all ``vllm:`` collectors and
registers its own. From then on the registry holds the newest engine's counters only: an
older engine goes on counting into its own (unregistered) counters, while ``get_metrics()``
on it reads the newest engine's, which do not move. A worker runs one engine, but the tests
and the benchmarks start several in one process, so a read of an older engine's counters came
back unchanged after a newer engine started (and a test's result depended on which engine the
session happened to start last). Here each engine's counters are
read from the Prometheus logger that engine created and still counts into (vLLM 0.32's
``StatLoggerManager`` -> ``PrometheusStatLogger.spec_decoding_prom``; an engine without a
speculative config has no such counters and reads as zeros, as the registry did).
"""

from __future__ import annotations

from typing import Any

SCALAR_COUNTERS = {
    "vllm:spec_decode_num_drafts": "counter_spec_decode_num_drafts",
    "vllm:spec_decode_num_draft_tokens": "counter_spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "counter_spec_decode_num_accepted_tokens",
}
"""vLLM's metric name -> the attribute of its ``SpecDecodingProm`` holding it per engine."""
PER_POSITION_COUNTER = "vllm:spec_decode_num_accepted_tokens_per_pos"


def _value(counter: Any) -> int:
    # prometheus_client's labelled counter keeps its total in a private ValueClass; it has no
    # public getter short of collecting the parent, which vLLM does not keep.
    return int(counter._value.get())


def spec_counters(llm_engine: Any, engine_index: int = 0) -> dict[str, Any]:
    """Cumulative spec-decode counters of ``llm_engine`` (a v1 ``LLMEngine``, ``LLM.llm_engine``
    for an ``LLM``): vLLM's name -> total, and the accepted tokens per draft position as a list.
    Take deltas around a workload."""
    out: dict[str, Any] = {name: 0 for name in SCALAR_COUNTERS}
    out[PER_POSITION_COUNTER] = []
    manager = getattr(llm_engine, "logger_manager", None)
    if manager is None:
        raise ValueError("the engine keeps no stats: start it with disable_log_stats=False")
    prom = next((s for s in manager.stat_loggers if hasattr(s, "spec_decoding_prom")), None)
    if prom is None:
        raise ValueError("the engine has no Prometheus stat logger to read counters from")
    spec = prom.spec_decoding_prom
    if not spec.spec_decoding_enabled:
        return out
    for name, attribute in SCALAR_COUNTERS.items():
        out[name] = _value(getattr(spec, attribute)[engine_index])
    per_position = getattr(spec, "counter_spec_decode_num_accepted_tokens_per_pos", {}).get(
        engine_index, []
    )
    out[PER_POSITION_COUNTER] = [_value(counter) for counter in per_position]
    return out
