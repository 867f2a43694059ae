"""Observability end to end: a real vLLM engine's steps and counters scraped over HTTP, and
`rlhfspec report --from-redis` reading a real Redis metrics stream."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from rlhfspec_api.generation import GenerationSpec
from rlhfspec_workers.local.redis_server import RedisServer
from rlhfspec_workers.messages import FIELD, IterationMetrics, Keys
from rlhfspec_workers.observability import WorkerMetrics, report

LABELS = {"job": "obs-test", "role": "generation", "worker": "obs-test-generation-0"}
K = 3


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[Sample], name: str) -> float:
    """Sum over every series of ``name``, checking each carries the worker's labels."""
    found = [s for s in samples if s.name == name]
    assert found, name
    assert all({k: s.labels[k] for k in LABELS} == LABELS for s in found)
    return sum(s.value for s in found)


@pytest.fixture(scope="module")
def engine(tiny_kit: Path) -> Iterator[Any]:
    from rlhfspec_workers.tinymodels.engine import cpu_engine_env

    cpu_engine_env()
    from rlhfspec_workers.generation.engine import GenerationEngine

    spec = GenerationSpec.model_validate(
        {
            "speculative": {
                "mode": "fixed",
                "maxDraftTokens": K,
                "numDraftTokens": K,
                "drafters": [{"method": "draft_model", "model": {"path": "tiny://draft"}}],
            }
        }
    )
    generation = GenerationEngine(
        spec,
        tiny_kit / "policy",
        draft_models={0: tiny_kit / "draft"},
        max_num_seqs=16,
        max_model_len=128,
        kv_cache_bytes=48 << 20,
    )
    yield generation
    generation.close()


@pytest.mark.engine
def test_generation_worker_metrics_follow_a_real_engine(engine: Any, tiny_kit: Path) -> None:
    from rlhfspec_workers.generation.records import PromptInput, SamplingConfig

    prompts = [
        json.loads(line)["prompt"] for line in (tiny_kit / "dataset" / "train.jsonl").open()
    ][:8]
    sampling = SamplingConfig(temperature=0.0, max_tokens=24)
    metrics = WorkerMetrics(LABELS["job"], LABELS["role"], LABELS["worker"])
    metrics.reexport_vllm(engine.counters)
    port = metrics.serve(0, addr="127.0.0.1")
    try:
        scrapes: list[list[Sample]] = []
        generated: list[int] = []
        for round_ in range(2):
            engine.drain_steps()
            batch = [
                PromptInput(prompt=p, prompt_id=f"r{round_}-{i}", n=2)
                for i, p in enumerate(prompts[4 * round_ : 4 * round_ + 4])
            ]
            results = engine.generate_all(batch, sampling)
            generated.append(sum(len(r.token_ids) for r in results))
            for step in engine.drain_steps():
                metrics.observe_step(step)
            scrapes.append(scrape(port))
    finally:
        metrics.close()
    first, second = scrapes

    def moved(name: str) -> float:
        delta = total(second, name) - total(first, name)
        assert delta > 0, name
        return delta

    # vLLM's own counters come through as vLLM counts them, labelled as ours...
    vllm_drafted = moved("vllm:spec_decode_num_draft_tokens_total")
    vllm_accepted = moved("vllm:spec_decode_num_accepted_tokens_total")
    moved("vllm:spec_decode_num_drafts_total")
    now = engine.counters()
    assert total(second, "vllm:spec_decode_num_draft_tokens_total") == float(
        now["vllm:spec_decode_num_draft_tokens"]
    )
    # ...and our per-step, per-position accounting agrees with them exactly.
    assert moved("rlhfspec_spec_draft_tokens_total") == vllm_drafted
    assert moved("rlhfspec_spec_accepted_tokens_total") == vllm_accepted
    assert total(second, "rlhfspec_spec_k") == K
    positions = {
        s.labels["position"] for s in second if s.name == "rlhfspec_spec_accepted_tokens_total"
    }
    assert positions == {str(p) for p in range(K)}
    # Without the caller's count, a step's tokens are estimated as batch + accepted: exact for
    # a decode step, high where vLLM accepted draft tokens past a sample's stop (dropped).
    tokens = moved("rlhfspec_generation_tokens_total")
    assert generated[1] <= tokens <= 1.25 * generated[1], (tokens, generated)
    assert moved("rlhfspec_generation_steps_total") >= generated[1] / (8 * (K + 1))


def test_report_from_redis_copies_the_metrics_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis

    server = RedisServer(tmp_path / "redis", password="s3cret")
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        keys = Keys("team-a", "grpo")
        records = [
            IterationMetrics(
                iteration=i,
                total_iterations=2,
                samples=4,
                tokens=10 * i,
                reward_mean=0.5 * i,
                stage_seconds={"generation": 1.0},
            )
            for i in (1, 2)
        ]
        for record in records:
            client.xadd(keys.metrics_stream, {FIELD: record.to_bytes()})
        run_dir = tmp_path / "run"
        assert report.main([str(run_dir), "--from-redis", server.url, "--job", "team-a/grpo"]) == 0
        copied = [
            IterationMetrics.model_validate_json(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        assert copied == records
        assert (run_dir / "report" / "summary.md").is_file()

        # A foreign payload in the stream is named by its entry id, nothing is written.
        bad_id = client.xadd(keys.metrics_stream, {FIELD: b'{"kind": "rollout"}'}).decode()
        assert (
            report.main(
                [str(tmp_path / "other"), "--from-redis", server.url, "--job", "team-a/grpo"]
            )
            == 1
        )
        assert not (tmp_path / "other").exists()
        assert f"rlhfspec:team-a:grpo:metrics entry {bad_id}: kind 'rollout'" in (
            capsys.readouterr().err
        )
        client.close()
    finally:
        server.stop()


def test_report_from_redis_names_an_empty_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        assert (
            report.main(
                [str(tmp_path / "run"), "--from-redis", server.url, "--job", "team-a/missing"]
            )
            == 1
        )
    finally:
        server.stop()
    assert "rlhfspec:team-a:missing:metrics has no records" in capsys.readouterr().err


@pytest.mark.engine
def test_steps_say_which_prefilled_and_how_long_the_worker_took_between_them(
    engine: Any, tiny_kit: Path
) -> None:
    """The load report's step profile is taken over decoding steps only, at engine time plus
    the gap before each step: both come from what vLLM and the engine record per step."""
    from rlhfspec_workers.generation.records import PromptInput, SamplingConfig

    prompts = [
        json.loads(line)["prompt"] for line in (tiny_kit / "dataset" / "train.jsonl").open()
    ][:3]
    engine.drain_steps()
    results = engine.generate_all(
        [PromptInput(prompt=p, prompt_id=f"p{i}", n=2) for i, p in enumerate(prompts)],
        SamplingConfig(temperature=0.0, max_tokens=12),
    )
    steps = engine.drain_steps()
    # Every request's prompt is counted once, in the step that finished prefilling it.
    assert sum(s.prefill_tokens for s in steps) == sum(len(r.prompt_token_ids) for r in results)
    # Six short prompts fit one step's token budget: the first step prefilled them all, and
    # every later one only decoded.
    assert steps[0].prefill_tokens > 0 and len(steps) > 1
    assert all(s.prefill_tokens == 0 for s in steps[1:])
    assert all(s.gap_seconds >= 0.0 for s in steps)
    assert sum(s.gap_seconds for s in steps[1:]) > 0.0
    # A worker waiting for tasks is idle, not working between steps: the first step after
    # the engine ran dry is timed from the first submission, so the wait is not in its gap
    # (it would price the prefill at the wait's length per prompt).
    idle = 0.5
    time.sleep(idle)
    engine.generate_all(
        [PromptInput(prompt=prompts[0], prompt_id="again", n=1)],
        SamplingConfig(temperature=0.0, max_tokens=4),
    )
    again = engine.drain_steps()
    assert again[0].prefill_tokens > 0
    assert again[0].gap_seconds < idle / 5
