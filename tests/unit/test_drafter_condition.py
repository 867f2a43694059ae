"""The pure DrafterCollapsed condition: the coordinator's collapsed drafters -> the job's
condition and events (set, unchanged, updated, recovered; a failed or empty read changes
nothing; a job that never collapsed gets no condition), and through ``status.reconcile``."""

from __future__ import annotations

import datetime
from pathlib import Path

import yaml

from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_api.status import ConditionStatus, ConditionType, Phase, RLHFJobStatus
from rlhfspec_operator.conditions import condition
from rlhfspec_operator.drafter_condition import apply_drafters, collapsed_message
from rlhfspec_operator.naming import desired_pods
from rlhfspec_operator.pods import PodView
from rlhfspec_operator.progress import ProgressRead
from rlhfspec_operator.status import Observation, reconcile, started
from rlhfspec_workers.messages import JobProgress

ROOT = Path(__file__).resolve().parents[2]

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
LATER = T0 + datetime.timedelta(minutes=5)
KIND = ConditionType.DRAFTER_COLLAPSED
Ticked = tuple[RLHFJobStatus, list[str]]
"""A reconcile tick's status and its events as type/reason."""


def _read(**collapsed: float) -> ProgressRead:
    progress = JobProgress(iteration=2, total_iterations=4, collapsed_drafters=collapsed)
    return ProgressRead(progress=progress, attempted=True)


def test_a_collapsed_drafter_sets_the_condition_with_one_warning() -> None:
    status = RLHFJobStatus()
    events = apply_drafters(status, _read(draft_model=1.0312), T0, 3)
    cond = condition(status, KIND)
    assert cond is not None and cond.status is ConditionStatus.TRUE
    assert cond.reason == "DrafterCollapsed" and cond.observed_generation == 3
    assert "draft_model (mean accepted length 1.03)" in cond.message
    assert "refresh: {every: 1}" in cond.message  # what to do about a stale draft model
    assert events == [("Warning", "DrafterCollapsed", cond.message)]
    assert cond.last_transition_time == "2026-01-01T12:00:00Z"

    # Still collapsed: no second event, the transition time stays.
    assert apply_drafters(status, _read(draft_model=1.0312), LATER, 3) == []
    again = condition(status, KIND)
    assert again is not None and again.last_transition_time == "2026-01-01T12:00:00Z"

    # Another drafter joins: the message names both, still no new event.
    assert apply_drafters(status, _read(draft_model=1.05, ngram=1.01), LATER, 3) == []
    both = condition(status, KIND)
    assert both is not None and both.status is ConditionStatus.TRUE
    assert "draft_model (mean accepted length 1.05)" in both.message
    assert "ngram (mean accepted length 1.01)" in both.message
    assert both.message.startswith("drafters ")


def test_recovery_sets_false_with_a_normal_event_once() -> None:
    status = RLHFJobStatus()
    apply_drafters(status, _read(draft_model=1.02), T0, 1)
    events = apply_drafters(status, _read(), LATER, 1)
    cond = condition(status, KIND)
    assert cond is not None and cond.status is ConditionStatus.FALSE
    assert cond.reason == "DraftersAccepting"
    assert cond.last_transition_time == "2026-01-01T12:05:00Z"
    assert events == [("Normal", "DraftersAccepting", cond.message)]
    assert apply_drafters(status, _read(), LATER, 1) == []  # recovered stays quiet
    # Collapsing again is a new transition: a new Warning.
    assert [e[0] for e in apply_drafters(status, _read(ngram=1.0), LATER, 1)] == ["Warning"]


def test_a_job_that_never_collapsed_gets_no_condition() -> None:
    status = RLHFJobStatus()
    assert apply_drafters(status, _read(), T0, 1) == []
    assert condition(status, KIND) is None


def test_a_failed_or_empty_read_changes_nothing() -> None:
    status = RLHFJobStatus()
    apply_drafters(status, _read(draft_model=1.02), T0, 1)
    before = status.model_copy(deep=True)
    failed = ProgressRead(error="ConnectionError: refused", attempted=True)
    for read in (failed, ProgressRead(), ProgressRead(attempted=True)):
        assert apply_drafters(status, read, LATER, 1) == []
        assert status == before  # Redis down, or no progress yet: still collapsed


def test_the_message_suggests_refresh_only_for_a_draft_model() -> None:
    ngram = collapsed_message({"ngram": 1.0})
    assert ngram.startswith("drafter ngram (mean accepted length 1.00) collapsed")
    assert "selector stops using it" in ngram and "refresh" not in ngram
    assert "refresh: {every: 1}" in collapsed_message({"draft_model": 1.0, "ngram": 1.0})


def test_reconcile_sets_and_clears_the_condition_while_the_job_keeps_running() -> None:
    job = parse_rlhfjob(yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text()))
    status, _ = started(job, 1, RLHFJobStatus(), T0)
    views = [
        PodView(name=name, job=job.name, role=role, index=index, owner_uid="uid",
                phase="Running", ready=True)
        for name, (role, index) in desired_pods(job.name, job.spec.generation.replicas).items()
    ]  # fmt: skip

    def tick(status: RLHFJobStatus, read: ProgressRead, seconds: int) -> Ticked:
        now = T0 + datetime.timedelta(seconds=seconds)
        plan = reconcile(Observation(job, 1, status, views, read, now))
        assert plan.status.phase is Phase.RUNNING  # a collapsed drafter never stops the job
        assert plan.create == [] and plan.delete == []
        return plan.status, [f"{e.type}/{e.reason}" for e in plan.events]

    status, events = tick(status, _read(), 1)
    assert condition(status, KIND) is None and "Warning/DrafterCollapsed" not in events
    status, events = tick(status, _read(draft_model=1.01), 2)
    assert events == ["Warning/DrafterCollapsed"]
    cond = condition(status, KIND)
    assert cond is not None and cond.status is ConditionStatus.TRUE
    status, events = tick(status, ProgressRead(error="TimeoutError", attempted=True), 3)
    cond = condition(status, KIND)
    assert cond is not None and cond.status is ConditionStatus.TRUE  # an outage keeps it
    status, events = tick(status, _read(), 4)
    assert "Normal/DraftersAccepting" in events
    cond = condition(status, KIND)
    assert cond is not None and cond.status is ConditionStatus.FALSE
