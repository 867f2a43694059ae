"""The reward contract end to end on the control plane: ``spec.reward`` / ``spec.rewards``
validation lines, the default, the config a worker re-reads, preflight's import of function
rewards, local mode's PYTHONPATH, the operator mounting a function's ConfigMap and failing the job
with a reward's reason."""

from __future__ import annotations

import copy
import datetime
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rlhfspec_api.manifest import ManifestError, RLHFJob, parse_rlhfjob
from rlhfspec_api.rewards import RewardRule, RewardType
from rlhfspec_api.status import ConditionStatus, Phase, RLHFJobStatus
from rlhfspec_operator import builders
from rlhfspec_operator.conditions import condition
from rlhfspec_operator.naming import Owner, desired_pods
from rlhfspec_operator.pods import PodView
from rlhfspec_operator.progress import ProgressRead
from rlhfspec_operator.status import Observation, reconcile, started
from rlhfspec_workers.local.run import user_pythonpath
from rlhfspec_workers.messages import JobProgress
from rlhfspec_workers.preflight import PreflightError, preflight

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())


def job_with(**spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLE)
    for key, value in spec.items():
        if value is None:
            doc["spec"].pop(key, None)
        else:
            doc["spec"][key] = value
    return doc


def errors_of(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_rlhfjob(doc)
    return [str(e) for e in info.value.errors]


# -- the manifest -----------------------------------------------------------------------------


def test_no_reward_means_the_sort_digits_rule_and_survives_the_round_trip() -> None:
    job = parse_rlhfjob(job_with(reward=None))
    assert [(f, t.rule) for f, t in job.spec.named_reward_terms] == [
        ("spec.reward", RewardRule.SORT_DIGITS)
    ]
    # Local mode and the operator hand workers the defaulted manifest: it must parse again.
    again = parse_rlhfjob(job.to_manifest())
    assert again.spec.reward_terms == job.spec.reward_terms
    assert job.to_manifest()["spec"]["reward"] == {"type": "rule", "rule": "sort_digits",
                                                    "weight": 1.0}  # fmt: skip


def test_rewards_sum_weighted_terms_and_survive_the_round_trip() -> None:
    rewards = [
        {"rule": "math_answer", "name": "correct"},
        {"rule": "regex", "pattern": r"<think>.*</think>", "weight": 0.2},
        {"type": "function", "function": "my_rewards:brevity", "configMap": "my-rewards",
         "weight": -0.1},
    ]  # fmt: skip
    job = parse_rlhfjob(job_with(reward=None, rewards=rewards))
    assert job.spec.reward is None
    named = job.spec.named_reward_terms
    assert [f for f, _ in named] == ["spec.rewards[0]", "spec.rewards[1]", "spec.rewards[2]"]
    assert [t.weight for _, t in named] == [1.0, 0.2, -0.1]
    assert [t.label for _, t in named] == ["correct", "regex", "my_rewards:brevity"]
    assert named[2][1].type is RewardType.FUNCTION and named[2][1].config_map == "my-rewards"
    assert parse_rlhfjob(job.to_manifest()).spec.reward_terms == job.spec.reward_terms


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"rewards": [{"rule": "math_answer"}]},  # reward is in the example too
            "spec.rewards: reward and rewards are both given (reward for one reward, or rewards "
            "for a weighted sum, not both)",
        ),
        (
            {"reward": {"rule": "regex", "pattern": "(unclosed"}},
            "spec.reward.pattern: '(unclosed' is not a valid regular expression: missing ), "
            "unterminated subpattern at position 0 (a Python regular expression)",
        ),
        (
            {"reward": {"rule": "regex"}},
            "spec.reward.pattern: rule regex needs a pattern (a Python regular expression)",
        ),
        (
            {"reward": None, "rewards": [{"rule": "math_answer"}, {"rule": "gsm8k"}]},
            "spec.rewards[1].rule: 'gsm8k' is not a valid choice (one of math_answer, "
            "exact_match, regex, sort_digits, final_number)",
        ),
        (
            {"reward": {"type": "rule"}},
            "spec.reward.rule: type rule needs a rule (one of math_answer, exact_match, regex, "
            "sort_digits, final_number)",
        ),
        (
            {"reward": {"type": "function", "function": "my-rewards.score"}},
            "spec.reward.function: 'my-rewards.score' is not package.module:function (a module "
            "path, a colon and a callable's name, e.g. my_rewards:score)",
        ),
        (
            {"reward": {"type": "function"}},
            "spec.reward.function: type function needs a function (package.module:function)",
        ),
        (
            {"reward": {"rule": "exact_match", "configMap": "x"}},
            "spec.reward.configMap: only applies to type function (type is rule) (remove "
            "configMap, or set type: function)",
        ),
        (
            {"reward": None, "rewards": []},
            "spec.rewards: must not be empty (a list)",
        ),
        (
            {"reward": None, "rewards": [{"type": "model"}]},
            "spec.models.reward: rewards[0].type model needs a reward model (set "
            "models.reward.path, or rewards[0].type: rule)",
        ),
        (
            {
                "reward": None,
                "rewards": [
                    {"rule": "math_answer", "name": "a"},
                    {"rule": "sort_digits", "name": "a"},
                ],
            },
            "spec.rewards: name listed more than once: a (unique names)",
        ),
    ],
)
def test_reward_errors_name_the_field_and_what_is_allowed(
    spec: dict[str, Any], expected: str
) -> None:
    assert errors_of(job_with(**spec)) == [expected]


def test_an_answer_rule_needs_an_answer_field() -> None:
    doc = job_with(reward={"rule": "math_answer"})
    doc["spec"]["dataset"]["answerField"] = None
    assert errors_of(doc) == [
        "spec.reward.rule: math_answer compares with the answer field but dataset.answerField "
        "is null (set dataset.answerField, or a rule that reads no answer: regex, sort_digits)"
    ]
    doc["spec"]["reward"] = {"rule": "regex", "pattern": "x"}
    parse_rlhfjob(doc)


# -- preflight --------------------------------------------------------------------------------


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    for name in ("policy", "draft"):
        (tmp_path / "kit" / name).mkdir(parents=True)
        (tmp_path / "kit" / name / "config.json").write_text(json.dumps({"vocab_size": 64}))
        (tmp_path / "kit" / name / "tokenizer.json").write_text("{}")
    (tmp_path / "kit" / "dataset").mkdir()
    row = {"prompt": "S312=", "answer": "123"}
    (tmp_path / "kit" / "dataset" / "train.jsonl").write_text(json.dumps(row) + "\n")
    return tmp_path / "kit"


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "modules"
    path.mkdir()
    (path / "pf_rewards.py").write_text("LIMIT = 3\n\ndef score(p, r, a, m):\n    return []\n")
    monkeypatch.syspath_prepend(str(path))
    yield path
    sys.modules.pop("pf_rewards", None)


def _preflight(kit: Path, **spec: Any) -> Callable[[], object]:
    job = parse_rlhfjob(job_with(**spec))
    return lambda: preflight(job.spec, tiny=lambda uri: kit / uri.removeprefix("tiny://"))


def test_preflight_imports_every_function_reward(kit: Path, module_dir: Path) -> None:
    _preflight(kit, reward={"type": "function", "function": "pf_rewards:score"})()
    check = _preflight(
        kit,
        reward=None,
        rewards=[
            {"rule": "sort_digits"},
            {"type": "function", "function": "pf_rewards:LIMIT"},
            {"type": "function", "function": "pf_missing_module:score"},
        ],
    )
    with pytest.raises(PreflightError) as info:
        check()
    lines = [str(e) for e in info.value.errors]
    assert [line.split(":")[0] for line in lines] == [
        "spec.rewards[1].function",
        "spec.rewards[2].function",
    ]
    assert "pf_rewards:LIMIT is a int, not a callable" in lines[0]
    assert (
        "cannot import 'pf_missing_module' for pf_missing_module:score: ModuleNotFoundError"
    ) in lines[1]
    assert "PYTHONPATH" in lines[1]  # what is allowed: where modules are looked for


def test_local_workers_get_the_current_directory_first_on_pythonpath(tmp_path: Path) -> None:
    environ = {"PYTHONPATH": "/opt/a:/opt/b"}
    assert user_pythonpath(tmp_path, environ) == f"{tmp_path}:/opt/a:/opt/b"
    assert user_pythonpath(tmp_path, {}) == str(tmp_path)
    assert user_pythonpath(Path("/opt/a"), environ) == "/opt/a:/opt/b"


# -- the operator -----------------------------------------------------------------------------


def _pods(job: RLHFJob) -> list[dict[str, Any]]:
    return builders.worker_pods(job, Owner(job.name, "team-a", "uid-1"))


def test_function_rewards_configmaps_are_mounted_and_on_pythonpath() -> None:
    rewards = [
        {"type": "function", "function": "fmt:score", "configMap": "team-rewards"},
        {"type": "function", "function": "length:score", "configMap": "team-rewards"},
        {"type": "function", "function": "extra:score", "configMap": "more-rewards"},
    ]
    doc = job_with(reward=None, rewards=rewards)
    doc["metadata"]["namespace"] = "team-a"
    pods = _pods(parse_rlhfjob(doc))
    assert len(pods) == 4
    for pod in pods:  # every pod's preflight imports the functions
        kubernetes_validate.validate(pod, "1.32.0", strict=True)
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PYTHONPATH"] == (
            "/etc/rlhfspec-rewards/team-rewards:/etc/rlhfspec-rewards/more-rewards"
        )
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        for path, config_map in (
            ("/etc/rlhfspec-rewards/team-rewards", "team-rewards"),
            ("/etc/rlhfspec-rewards/more-rewards", "more-rewards"),
        ):
            assert mounts[path]["readOnly"] is True
            assert volumes[mounts[path]["name"]]["configMap"] == {"name": config_map}


def test_jobs_without_a_configmap_get_no_extra_mount_or_pythonpath() -> None:
    doc = job_with(reward={"type": "function", "function": "in_image:score"})
    doc["metadata"]["namespace"] = "team-a"
    for pod in _pods(parse_rlhfjob(doc)):
        container = pod["spec"]["containers"][0]
        assert "PYTHONPATH" not in {e["name"] for e in container["env"]}
        assert not any(m["mountPath"].startswith("/etc/rlhfspec-rewards")
                       for m in container["volumeMounts"])  # fmt: skip


def test_a_reward_failure_becomes_the_jobs_failed_condition_with_its_message() -> None:
    """The coordinator's failed progress wins over the inference pod's exit: users read the
    field and the reason, not "pod failed"."""
    doc = job_with(reward={"type": "function", "function": "my_rewards:score"})
    doc["metadata"]["namespace"] = "ns"
    job = parse_rlhfjob(doc)
    t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    views = [
        PodView(name=name, job=job.name, role=role, index=index, uid=f"uid-{name}",
                owner_uid="job-uid", phase="Failed" if role == "inference" else "Running",
                ready=role != "inference",
                detail="container inference terminated: Error (exit code 1)")
        for name, (role, index) in desired_pods(job.name, 1).items()
    ]  # fmt: skip
    status, _ = started(job, 1, RLHFJobStatus(), t0)
    message = (
        "spec.reward.function: my_rewards:score raised KeyError: 'difficulty' "
        "(reported by inference-0)"
    )
    progress = JobProgress(iteration=0, total_iterations=4, state="failed", message=message)
    observed = Observation(
        job, 1, status, views, ProgressRead(progress=progress, attempted=True),
        t0 + datetime.timedelta(seconds=30),
    )  # fmt: skip
    plan = reconcile(observed)
    assert plan.status.phase is Phase.FAILED
    assert (plan.status.reason, plan.status.message) == ("CoordinatorFailed", message)
    failed = condition(plan.status, "Failed")
    assert failed is not None and failed.status is ConditionStatus.TRUE
    assert failed.message == message
    assert [(e.type, e.message) for e in plan.events] == [("Warning", message)]
