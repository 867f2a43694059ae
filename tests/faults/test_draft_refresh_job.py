"""A draft kept fresh inside a real job: picked up by generation at the next iteration, lossless,
and a trainer SIGKILLed while publishing a refreshed draft leaves the old draft in use.

The job is the fault harness's tiny greedy job with speculation on: mode fixed, the tiny kit's
``draft_model`` at k=4 with ``refresh: {every: 1}``, distilled while the next iteration
generates (``overlap``, the default) or before the weights are published. Greedy decoding
is exact, so every sample's tokens must equal the session's fault-free run without
speculation (drafting with the fresh draft, the stale one and none gives the same
rollouts), and the metrics rows say which draft version drafted each iteration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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

from rlhfspec_api.manifest import RLHFJob, parse_rlhfjob

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]


def refresh_job(name: str, overlap: bool) -> RLHFJob:
    manifest = fault_job(name).to_manifest()
    manifest["spec"]["generation"]["speculative"] = {
        "mode": "fixed",
        "maxDraftTokens": 4,
        "drafters": [
            {
                "method": "draft_model",
                "model": {"path": "tiny://draft", "dtype": "float32"},
                "refresh": {"every": 1, "steps": 8, "learningRate": 1e-4, "overlap": overlap},
            }
        ],
    }
    return parse_rlhfjob(manifest)


def _rows(run: FaultRun) -> list[dict[str, Any]]:
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _tokens(run: FaultRun) -> dict[str, Any]:
    return {sample: line["tokens_sha256"] for sample, line in run.by_sample().items()}


def _assert_exactly_once(run: FaultRun) -> None:
    for iteration in range(1, ITERATIONS + 1):
        ids = [line["sample_id"] for line in run.trained[iteration]]
        assert sorted(ids) == expected_sample_ids(run.job, run.run_dir, iteration)
    samples = ITERATIONS * PROMPTS * SAMPLES
    assert run.stream_lengths == {"tasks": samples, "rollouts": samples, "experience": samples}


def _complete_drafts(run: FaultRun) -> list[str]:
    drafts = run.run_dir / "drafts"
    assert not [p.name for p in drafts.iterdir() if p.name.startswith(".")], "partial drafts"
    for version in drafts.iterdir():
        assert (version / "config.json").is_file() and list(version.glob("*.safetensors"))
    return sorted(p.name for p in drafts.iterdir())


@pytest.fixture(scope="module")
def refreshed_run(tiny_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> FaultRun:
    job = refresh_job("refresh", overlap=True)
    run = run_job(job, tmp_path_factory.mktemp("refresh"), fault=None)
    assert run.killed == []
    return run


def test_a_refreshed_draft_drafts_the_next_iteration_and_changes_no_token(
    refreshed_run: FaultRun, fault_free_run: FaultRun
) -> None:
    rows = _rows(refreshed_run)
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    # overlap: the draft distilled on iteration 1's rollouts is distilled while iteration 2
    # generates, published with policy v2 and drafts iteration 3. None follows iteration 2:
    # no iteration would draft with it.
    assert [row["draft_version"] for row in rows] == [0, 0, 1]
    assert [row["draft_refresh_seconds"] > 0 for row in rows] == [False, True, False]
    for row in rows:  # the draft really drafted, and some of its tokens were accepted
        assert 0 < row["draft_acceptance"]["draft_model"] <= 1, row["draft_acceptance"]
    assert _complete_drafts(refreshed_run) == ["v1"]
    assert "policy v2 and draft v1 loaded" in refreshed_run.log("generation-0")
    assert "draft v1 distilled on 8 rollouts (every 1 iteration(s))" in refreshed_run.log(
        "trainer-0"
    )
    _assert_exactly_once(refreshed_run)
    # Lossless: the same greedy rollouts as the run that never drafted.
    assert _tokens(refreshed_run) == _tokens(fault_free_run)


def test_trainer_killed_while_writing_a_draft_leaves_the_old_draft_in_use(
    fault_free_run: FaultRun, tmp_path: Path
) -> None:
    job = refresh_job("refresh-fault", overlap=False)  # distilled before the weights publish
    run = run_job(job, tmp_path / "run", fault="trainer:mid_draft_write:1")
    assert run.killed == ["trainer-0"]
    assert sorted(p.name for p in (run.run_dir / "faults").glob("*.fired")) == [
        "trainer-0.mid_draft_write.1.fired"
    ]
    trainer_log = run.log("trainer-0")
    assert "removed the partial draft export .v1.tmp-" in trainer_log
    assert "resumed from checkpoint 1" in trainer_log
    rows = _rows(run)
    # The half-written v1 never became a version: iteration 2 drafted with the draft as given,
    # and the refresh after iteration 2 was published for iteration 3.
    assert [row["draft_version"] for row in rows] == [0, 0, 2]
    assert _complete_drafts(run) == ["v2"]
    _assert_exactly_once(run)
    assert _tokens(run) == _tokens(fault_free_run)
