"""Kill one role with SIGKILL at a named hook, restart it as Kubernetes would, and the job still
trains every iteration on exactly its samples, each once, identical to a fault-free run.

Each test runs one tiny greedy job (``fault_harness``) with ``RLHFSPEC_FAULT`` set and compares
the trainer's record of what it trained on (``<storage>/trained/iter-N.jsonl``) with the
session's fault-free run: the same sample ids per iteration, each once, and per sample the same
tokens (hash), reward, rollout and reference log-prob sums and generating policy version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_harness import (
    ITERATIONS,
    PROMPTS,
    SAMPLES,
    FaultRun,
    expected_sample_ids,
    fault_job,
    run_job,
)

from rlhfspec_workers.trainer.trained_record import record_path

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]


def assert_trained_like_fault_free(run: FaultRun, fault_free: FaultRun) -> None:
    for iteration in range(1, ITERATIONS + 1):
        ids = [line["sample_id"] for line in run.trained[iteration]]
        expected = expected_sample_ids(run.job, run.run_dir, iteration)
        assert sorted(ids) == expected, f"iteration {iteration} trained on {ids}"
        assert len(ids) == len(set(ids))
    recovered, reference = run.by_sample(), fault_free.by_sample()
    assert recovered.keys() == reference.keys()
    fields = (
        "tokens_sha256",
        "response_tokens",
        "reward",
        "logprob_sum",
        "ref_logprob_sum",
        "weight_version",
    )
    different = {
        sample: {
            f: (recovered[sample][f], reference[sample][f])
            for f in fields
            if recovered[sample][f] != reference[sample][f]
        }
        for sample in reference
    }
    assert not any(different.values()), {s: d for s, d in different.items() if d}
    # Nothing was published twice on the way: one task, one rollout, one experience a sample.
    samples = ITERATIONS * PROMPTS * SAMPLES
    assert run.stream_lengths == {"tasks": samples, "rollouts": samples, "experience": samples}


def assert_tokens_are_the_trained_tokens(run: FaultRun) -> None:
    """Each metrics row's ``tokens`` (what tokens/s is computed from) is the sum of the
    response tokens the trainer trained on in that iteration: every sample counted once."""
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").open()]
    tokens = {row["iteration"]: row["tokens"] for row in rows}
    trained = {
        iteration: sum(line["response_tokens"] for line in lines)
        for iteration, lines in run.trained.items()
    }
    assert tokens == trained, (tokens, trained)


def _fired(run: FaultRun) -> list[str]:
    return sorted(p.name for p in (run.run_dir / "faults").glob("*.fired"))


def test_trainer_killed_mid_weight_write(fault_free_run: FaultRun, tmp_path: Path) -> None:
    run = run_job(fault_job(), tmp_path / "run", fault="trainer:mid_weight_write:2")
    assert run.killed == ["trainer-0"]
    assert _fired(run) == ["trainer-0.mid_weight_write.2.fired"]
    assert_trained_like_fault_free(run, fault_free_run)
    trainer_log = run.log("trainer-0")
    # The killed export's temp dir was found and removed by the restarted trainer, which
    # resumed from checkpoint 2 (saved before the export) and exported v2 from it.
    assert "removed the partial weight export .v2.tmp-" in trainer_log
    assert "resumed from checkpoint 2" in trainer_log
    weights = run.run_dir / "weights"
    assert not [p.name for p in weights.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in weights.iterdir()) == ["v1", "v2", "v3"]
    for version in weights.iterdir():
        assert (version / "config.json").is_file() and list(version.glob("*.safetensors"))
    generation_log = run.log("generation-0")
    assert "policy v2 loaded" in generation_log


def test_generation_killed_while_loading_new_weights(
    fault_free_run: FaultRun, tmp_path: Path
) -> None:
    # The first weight sync (v1, after iteration 1): vLLM holds the new weights, the tied
    # head's packed copy still the old ones. The restarted worker must generate iteration 2
    # from v1 in full: the per-sample weight_version and log-prob sums below say it did.
    run = run_job(fault_job(), tmp_path / "run", fault="generation-0:mid_weight_load:1")
    assert run.killed == ["generation-0"]
    assert _fired(run) == ["generation-0.mid_weight_load.1.fired"]
    assert_trained_like_fault_free(run, fault_free_run)


def test_inference_killed_after_consuming_rollouts_before_acking(
    fault_free_run: FaultRun, tmp_path: Path
) -> None:
    run = run_job(fault_job(), tmp_path / "run", fault="inference:before_publish_experiences:2")
    assert run.killed == ["inference-0"]
    assert _fired(run) == ["inference-0.before_publish_experiences.2.fired"]
    assert_trained_like_fault_free(run, fault_free_run)


def test_generation_killed_after_publishing_rollouts_with_tasks_unacked(
    fault_free_run: FaultRun, tmp_path: Path
) -> None:
    run = run_job(fault_job(), tmp_path / "run", fault="generation-0:after_publish_rollouts:2")
    assert run.killed == ["generation-0"]
    assert _fired(run) == ["generation-0.after_publish_rollouts.2.fired"]
    assert_trained_like_fault_free(run, fault_free_run)
    # The kill came after the 2nd step that finished samples of iteration 1 (all 8 tasks taken
    # at once): the samples still decoding then were finished by the restarted worker.
    before = sorted(s for s, t in run.rollouts_at.items() if t <= run.fired_at())
    after_in_1 = [s for s, t in run.rollouts_at.items() if t > run.fired_at() and "it1/" in s]
    assert before and all(s.startswith("it1/") for s in before), before
    assert after_in_1, run.rollouts_at


def test_coordinator_killed_mid_iteration_and_restarted(
    fault_free_run: FaultRun, tmp_path: Path
) -> None:
    # Restarted 15 s after its death (a kubelet's back-off is 10 s at first): meanwhile the
    # workers finish iteration 2 on their own, the case that used to lose its metrics row.
    fault = "coordinator:coordinator_mid_iteration:2"
    run = run_job(fault_job(), tmp_path / "run", fault=fault, restart_delay=15.0)
    assert run.killed == ["coordinator-0"]
    ((_, restarted_at),) = run.restarted_at
    assert record_path(run.run_dir, 2).stat().st_mtime < restarted_at
    assert _fired(run) == ["coordinator-0.coordinator_mid_iteration.2.fired"]
    assert_trained_like_fault_free(run, fault_free_run)
    # The restarted coordinator finished the job; iteration 2's tasks were published once (the
    # stream lengths above). Every iteration has exactly one row, in the file and the stream,
    # iteration 2's included, though it had finished training before the new process was up.
    metrics = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").open()]
    assert [m["iteration"] for m in metrics] == list(range(1, ITERATIONS + 1))
    assert run.metrics_rows == list(range(1, ITERATIONS + 1))
    assert [m["weight_version"] for m in metrics] == list(range(1, ITERATIONS + 1))
    assert all(m["samples"] == PROMPTS * SAMPLES for m in metrics), metrics
    assert run.log("coordinator-0").count("coordinator-0 of default/faults starting") == 2


def test_trainer_killed_after_publishing_weights_before_acking(
    fault_free_run: FaultRun, tmp_path: Path
) -> None:
    run = run_job(fault_job(), tmp_path / "run", fault="trainer:after_weight_publish:1")
    assert run.killed == ["trainer-0"]
    assert_trained_like_fault_free(run, fault_free_run)
    # Checkpoint 1 and v1 were both written: the restart trains nothing again (iteration 1's
    # redelivered experiences are acked as already trained) and exports nothing again.
    assert "resumed from checkpoint 1" in run.log("trainer-0")
    assert record_path(run.run_dir, 1).stat().st_mtime <= run.fired_at()
    assert (run.run_dir / "weights" / "v1" / "model.safetensors").stat().st_mtime <= run.fired_at()


def test_generation_killed_with_finished_samples_unpublished(
    fault_free_run: FaultRun, tmp_path: Path
) -> None:
    run = run_job(fault_job(), tmp_path / "run", fault="generation-0:before_publish_rollouts:1")
    assert run.killed == ["generation-0"]
    assert_trained_like_fault_free(run, fault_free_run)
    # Nothing was published before the kill: every rollout came from the restarted worker.
    assert all(t > run.fired_at() for t in run.rollouts_at.values())
    # The killed worker had decoded (and counted, as its own work) samples it never
    # published; the iteration's tokens count each published sample once, as without a kill.
    assert_tokens_are_the_trained_tokens(run)
    assert_tokens_are_the_trained_tokens(fault_free_run)


def test_generation_killed_with_the_last_samples_of_an_iteration_unpublished(
    fault_free_run: FaultRun, tmp_path: Path
) -> None:
    # The kill at the step that finishes iteration 1's last samples: the worker's counters were
    # flushed just before it (a worker's last samples force a heartbeat), so tokens counted
    # before publishing would count the restarted worker's copies again (the kill above, at
    # the first such step, loses them with the process instead). All 8 tasks are taken at once
    # and decode a token a step: a sample finishes at the step of its length's rank.
    lengths = sorted({line["response_tokens"] for line in fault_free_run.trained[1]})
    fault = f"generation-0:before_publish_rollouts:{len(lengths)}"
    run = run_job(fault_job(), tmp_path / "run", fault=fault)
    assert run.killed == ["generation-0"]
    assert_trained_like_fault_free(run, fault_free_run)
    longest = {
        line["sample_id"]
        for line in fault_free_run.trained[1]
        if line["response_tokens"] == lengths[-1]
    }
    after = {s for s, t in run.rollouts_at.items() if t > run.fired_at() and s.startswith("it1/")}
    assert after == longest, (after, longest)
    assert_tokens_are_the_trained_tokens(run)
