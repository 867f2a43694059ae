"""WorkerMetrics over real HTTP: scrape twice, counters move, every series has our labels."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from rlhfspec_workers.generation.records import StepRecord
from rlhfspec_workers.messages import IterationMetrics, WorkerStatus
from rlhfspec_workers.observability import WorkerMetrics

LABELS = {"job": "team-a/grpo", "role": "generation", "worker": "grpo-generation-1"}


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, f"{name} {labels}: {len(found)} samples"
    return found[0]


def step(
    index: int,
    *,
    batch: int,
    drafter: str = "draft_model",
    k: int = 3,
    accepted: tuple[int, ...] = (3, 2, 1),
    next_k: int = 4,
) -> StepRecord:
    drafted = tuple(batch for _ in range(k))
    return StepRecord(
        step=index,
        batch_size=batch,
        num_finished=0,
        drafter=drafter,
        k=k,
        num_drafts=batch,
        num_draft_tokens=sum(drafted),
        num_accepted_tokens=sum(accepted),
        accepted_per_pos=accepted,
        drafted_per_pos=drafted,
        proposer_draft_tokens=sum(drafted),
        proposer_accepted_tokens=sum(accepted),
        next_drafter=drafter,
        next_k=next_k,
        next_draft_tokens=batch * next_k,
        step_seconds=0.02,
        draft_seconds=0.005,
    )


@pytest.fixture
def metrics() -> Iterator[WorkerMetrics]:
    m = WorkerMetrics(LABELS["job"], LABELS["role"], LABELS["worker"])
    yield m
    m.close()


def test_scraped_twice_the_counters_move_with_the_worker_labels(metrics: WorkerMetrics) -> None:
    port = metrics.serve(0, addr="127.0.0.1")
    assert port > 0
    metrics.observe_step(step(0, batch=4))
    first = scrape(port)
    metrics.observe_step(step(1, batch=3, accepted=(2, 0, 0), next_k=1))
    metrics.observe_step(step(2, batch=2, drafter="suffix", k=2, accepted=(1, 1), next_k=2))
    metrics.observe_migration(tokens=40, seconds=0.3, samples=2)
    metrics.observe_reclaimed(3)
    second = scrape(port)

    # Every rlhfspec_* series carries exactly our job/role/worker.
    ours = [s for s in second if s.name.startswith("rlhfspec_")]
    assert ours
    assert all({k: s.labels[k] for k in LABELS} == LABELS for s in ours)

    tokens = "rlhfspec_generation_tokens_total"
    assert value(first, tokens) == 4 + 6
    assert value(second, tokens) == 4 + 6 + (3 + 2) + (2 + 2)
    assert value(second, "rlhfspec_generation_steps_total") == 3
    assert value(second, "rlhfspec_generation_running_batch_size") == 2
    accepted = "rlhfspec_spec_accepted_tokens_total"
    assert value(first, accepted, drafter="draft_model", position="0") == 3
    assert value(second, accepted, drafter="draft_model", position="0") == 3 + 2
    assert value(second, accepted, drafter="draft_model", position="2") == 1
    assert value(second, accepted, drafter="suffix", position="1") == 1
    assert (
        value(second, "rlhfspec_spec_draft_tokens_total", drafter="draft_model", position="1")
        == 4 + 3
    )
    assert value(second, "rlhfspec_spec_drafts_total", drafter="suffix") == 2
    # The chosen strategy: gauge (last choice) and histogram (one observation per step).
    assert value(second, "rlhfspec_spec_k") == 2
    assert value(second, "rlhfspec_spec_drafter", drafter="suffix") == 1
    assert value(second, "rlhfspec_spec_drafter", drafter="draft_model") == 0
    chosen = "rlhfspec_spec_k_chosen_bucket"
    assert value(second, chosen, drafter="draft_model", le="1.0") == 1
    assert value(second, chosen, drafter="draft_model", le="4.0") == 2
    assert value(second, "rlhfspec_spec_k_chosen_count", drafter="suffix") == 1
    assert value(second, "rlhfspec_migrations_total") == 2
    assert value(second, "rlhfspec_migrated_tokens_total") == 40
    assert value(second, "rlhfspec_migration_seconds_sum") == pytest.approx(0.3)
    assert value(second, "rlhfspec_samples_reclaimed_total") == 3


def test_iteration_status_and_decisions_become_gauges(metrics: WorkerMetrics) -> None:
    record = IterationMetrics(
        iteration=2,
        total_iterations=5,
        samples=16,
        reward_mean=0.25,
        reward_std=0.5,
        kl=0.02,
        policy_loss=-0.1,
        value_loss=None,
        tokens_per_second=321.0,
        mean_accepted_length=2.5,
        migrations=4,
        reclaimed=1,
        weight_version=2,
        strategy_table_version=7,
        stage_seconds={"generation": 3.0, "inference": 1.0, "training": 2.0, "sync": 0.5},
        draft_acceptance={"draft_model": 0.375, "suffix": 0.25},
        draft_version=1,
    )
    metrics.observe_iteration(record)
    metrics.observe_iteration(record.model_copy(update={"iteration": 3, "reward_mean": 0.5}))
    metrics.set_calibration_age(12.5)
    metrics.observe_status(
        WorkerStatus(
            worker=LABELS["worker"],
            role="generation",
            running=9,
            weight_version=3,
            tokens_per_second=111.0,
            strategy_table_version=8,
        )
    )
    samples = [
        s for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples
    ]
    assert value(samples, "rlhfspec_iteration") == 3
    assert value(samples, "rlhfspec_reward_mean") == 0.5
    assert value(samples, "rlhfspec_reward_std") == 0.5
    assert value(samples, "rlhfspec_kl") == pytest.approx(0.02)
    assert value(samples, "rlhfspec_policy_loss") == pytest.approx(-0.1)
    # value_loss was never reported (GRPO): no series rather than a NaN.
    assert not [s for s in samples if s.name == "rlhfspec_value_loss"]
    assert value(samples, "rlhfspec_stage_seconds", stage="training") == 2.0
    assert value(samples, "rlhfspec_stage_cumulative_seconds_total", stage="generation") == 6.0
    assert value(samples, "rlhfspec_iteration_migrations") == 4
    assert value(samples, "rlhfspec_iteration_draft_acceptance", drafter="draft_model") == 0.375
    assert value(samples, "rlhfspec_iteration_draft_acceptance", drafter="suffix") == 0.25
    assert value(samples, "rlhfspec_draft_version") == 1
    assert value(samples, "rlhfspec_iteration_samples_reclaimed") == 1
    assert value(samples, "rlhfspec_calibration_age_seconds") == 12.5
    assert value(samples, "rlhfspec_strategy_table_version") == 8  # the heartbeat came last
    assert value(samples, "rlhfspec_weight_version") == 3
    assert value(samples, "rlhfspec_generation_running_batch_size") == 9
    assert value(samples, "rlhfspec_generation_tokens_per_second") == 111.0


def test_vllm_counters_are_reexported_as_read_with_our_labels(metrics: WorkerMetrics) -> None:
    reads: list[int] = []

    def counters() -> dict[str, float | list[int]]:
        reads.append(1)
        return {
            "vllm:spec_decode_num_drafts": 10.0 * len(reads),
            "vllm:spec_decode_num_accepted_tokens_per_pos": [7, 4],
            "vllm:num_requests_running": 3.0,  # not spec-decode: not ours to re-export
        }

    metrics.reexport_vllm(counters)
    with pytest.raises(RuntimeError, match="already"):
        metrics.reexport_vllm(counters)
    port = metrics.serve(0, addr="127.0.0.1")
    first, second = scrape(port), scrape(port)
    assert value(first, "vllm:spec_decode_num_drafts_total", **LABELS) == 10
    assert value(second, "vllm:spec_decode_num_drafts_total", **LABELS) == 20
    per_pos = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
    assert value(second, per_pos, position="1", **LABELS) == 4
    assert not [s for s in second if s.name.startswith("vllm:num_requests")]


def test_a_failing_engine_read_leaves_our_metrics_scrapable(metrics: WorkerMetrics) -> None:
    def closed_engine() -> dict[str, float]:
        raise RuntimeError("engine closed")

    metrics.reexport_vllm(closed_engine)
    metrics.set_weight_version(5)
    port = metrics.serve(0, addr="127.0.0.1")
    samples = scrape(port)
    assert value(samples, "rlhfspec_weight_version") == 5
    assert not [s for s in samples if s.name.startswith("vllm:")]
    with pytest.raises(RuntimeError, match="already serving"):
        metrics.serve(0)
