"""The dataset reader: JSON lines and Parquet, chat prompts, nested fields, held-out splits,
and every bad row named by file, line and field before any process starts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rlhfspec_api.manifest import parse_rlhfjob
from rlhfspec_api.spec import RewardRule, RewardSpec, RewardType, RLHFJobSpec
from rlhfspec_workers.coordinator.tasks import eval_due, eval_summary, eval_tasks, full_credit
from rlhfspec_workers.data.rows import DatasetError, lookup, read_rows, split_eval
from rlhfspec_workers.preflight import PreflightError, check_dataset, has_chat_template

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_and_string_prompts_nested_fields_and_metadata(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"q": {"msgs": CHAT}, "sol": {"final": 4}, "level": 1},
            {"q": {"msgs": "plain text"}, "sol": {"final": "7"}, "level": 3},
        ],
    )
    rows = read_rows(path, "q.msgs", "sol.final", require_answer=True)
    assert rows[0].messages is not None and [m.role for m in rows[0].messages] == [
        "system",
        "user",
    ]
    assert rows[0].prompt == "2+2?"  # the last user turn is the prompt text
    assert rows[0].answer == "4"  # numbers are read as their text
    assert rows[0].metadata == {"level": 1}
    assert rows[1].messages is None and rows[1].prompt == "plain text"
    assert rows[1].where == f"{path}:2"
    assert lookup({"a.b": 1, "a": {"b": 2}}, "a.b") == (True, 1)  # a dotted key wins
    assert lookup({"a": {}}, "a.b") == (False, None)


def test_parquet_reads_like_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist(
        [{"prompt": CHAT, "answer": "4"}, {"prompt": [{"role": "user", "content": "x"}],
                                           "answer": "5"}]
    )  # fmt: skip
    pq.write_table(table, path)
    rows = read_rows(path, "prompt", "answer", require_answer=True)
    assert [r.answer for r in rows] == ["4", "5"]
    assert rows[1].messages is not None and rows[1].messages[0].content == "x"
    assert rows[1].where == f"{path}: row 2"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ([{"content": "hi"}], "prompt[0] has no role"),
        ([{"role": "bot", "content": "hi"}], "prompt[0] has role 'bot'; allowed roles: system"),
        ([{"role": "user", "content": 3}], "prompt[0] content is int, not a string"),
        ([], "prompt is an empty list of messages"),
        (["hi"], "prompt[0] is str, not a {role, content} object"),
        (7, "prompt is int"),
    ],
)
def test_malformed_messages_name_file_line_and_what_is_wrong(
    tmp_path: Path, prompt: object, expected: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok"}, {"prompt": prompt}])
    with pytest.raises(DatasetError) as info:
        read_rows(path, "prompt", None)
    (problem,) = info.value.problems
    assert problem.field == "spec.dataset.promptField"
    assert problem.message.startswith(f"{path}:2: {expected}")


def test_missing_answer_is_an_error_only_when_the_reward_needs_it(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    assert [r.answer for r in read_rows(path, "prompt", "answer")] == ["1", None]
    with pytest.raises(DatasetError) as info:
        read_rows(path, "prompt", "answer", require_answer=True)
    (problem,) = info.value.problems
    assert problem.field == "spec.dataset.answerField"
    assert problem.message == f"{path}:2: row has no field 'answer'"


def test_eval_fraction_split_is_seeded_disjoint_and_refuses_to_take_everything(
    tmp_path: Path,
) -> None:
    rows = read_rows(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}"} for i in range(20)]), "prompt", None
    )
    train, held = split_eval(rows, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert not {r.index for r in train} & {r.index for r in held}
    assert split_eval(rows, 0.25, seed=3) == (train, held)
    assert split_eval(rows, 0.25, seed=4)[1] != held
    with pytest.raises(DatasetError) as info:
        split_eval(rows[:2], 0.9, seed=0)
    assert info.value.problems[0].field == "spec.dataset.evalFraction"
    assert "leaving no training rows" in info.value.problems[0].message


def _spec(tmp_path: Path, **dataset: object) -> RLHFJobSpec:
    manifest = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    manifest["spec"]["dataset"] = {"path": str(tmp_path / "d.jsonl"), **dataset}
    return parse_rlhfjob(manifest).spec


def _model(path: Path, template: str | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {"chat_template": template} if template else {}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_preflight_refuses_chat_rows_without_a_template_or_with_chat_template_off(
    tmp_path: Path,
) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": CHAT, "answer": "4"}])
    bare = _model(tmp_path / "bare", None)
    chatty = _model(tmp_path / "chatty", "{{ messages }}")
    assert has_chat_template(chatty) and not has_chat_template(bare)
    _, _, errors = check_dataset(_spec(tmp_path), None, policy_dir=bare)
    assert [e.path for e in errors] == ["spec.dataset.chatTemplate"]
    assert "has no chat template" in errors[0].problem
    _, _, errors = check_dataset(_spec(tmp_path, chatTemplate="off"), None, policy_dir=chatty)
    assert [e.path for e in errors] == ["spec.dataset.chatTemplate"]
    assert "only the chat template can render" in errors[0].problem
    _, _, errors = check_dataset(_spec(tmp_path), None, policy_dir=chatty)
    assert errors == []
    # chatTemplate: true (a YAML boolean) means on, and on needs a template even for strings.
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    _, _, errors = check_dataset(_spec(tmp_path, chatTemplate=True), None, policy_dir=bare)
    assert [e.path for e in errors] == ["spec.dataset.chatTemplate"]


def test_preflight_checks_the_eval_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}] * 3)
    spec = _spec(tmp_path, eval=str(tmp_path / "missing.jsonl"))
    _, _, errors = check_dataset(spec, None)
    assert [e.path for e in errors] == ["spec.dataset.eval"]
    _, _, errors = check_dataset(_spec(tmp_path, evalFraction=0.9), None)
    assert [e.path for e in errors] == ["spec.dataset.evalFraction"]
    write_jsonl(tmp_path / "e.jsonl", [{"prompt": "z"}])
    _, _eval_path, errors = check_dataset(_spec(tmp_path, eval=str(tmp_path / "e.jsonl")), None)
    assert [e.path for e in errors] == ["spec.dataset.answerField"]
    assert errors[0].problem.startswith(f"{tmp_path / 'e.jsonl'}:1: row has no field 'answer'")
    with pytest.raises(Exception, match="evalFraction"):
        _spec(tmp_path, eval="x.jsonl", evalFraction=0.5)


def test_eval_tasks_are_greedy_and_due_before_training_every_n_and_last(tmp_path: Path) -> None:
    rows = read_rows(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": CHAT, "answer": "4"}] * 3), "prompt", "answer"
    )
    spec = _spec(tmp_path, evalFraction=0.5, evalEvery=2, evalMaxTokens=9)
    tasks = eval_tasks(spec, rows, version=4)
    assert {t.eval for t in tasks} == {True} and {t.temperature for t in tasks} == {0.0}
    assert {t.weight_version for t in tasks} == {4} and {t.max_tokens for t in tasks} == {9}
    assert len({t.sample_id for t in tasks}) == 3 and tasks[0].messages is not None
    due = [i for i in range(0, spec.algorithm.iterations + 1) if eval_due(spec, i)]
    last = spec.algorithm.iterations
    assert due == sorted({0, last, *range(2, last + 1, 2)})
    assert not eval_due(_spec(tmp_path), 0)
    summary = eval_summary(3, [1.0, 0.0, 1.2, 0.5], seconds=2.0)
    assert summary.accuracy == 0.5 and summary.reward_mean == pytest.approx(0.675)
    assert eval_summary(3, [1.0, 0.0, 1.1], 1.0, credit=1.1).accuracy == pytest.approx(1 / 3)
    assert full_credit(spec) == 1.0  # the tiny example's one sort_digits rule
    weighted = _spec(tmp_path).model_copy(
        update={
            "reward": None,
            "rewards": [
                RewardSpec(type=RewardType.RULE, rule=RewardRule.MATH_ANSWER, weight=1.0),
                RewardSpec(type=RewardType.RULE, rule=RewardRule.REGEX, pattern="####",
                           weight=0.1),
                RewardSpec(type=RewardType.FUNCTION, function="m:f", weight=5.0),
            ],
        }
    )  # fmt: skip
    assert full_credit(weighted) == pytest.approx(1.1)


def test_preflight_error_lists_every_bad_row(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "x", "content": "a"}]}, {"p": 1}])
    with pytest.raises(PreflightError) as info:
        from rlhfspec_workers.preflight import preflight

        preflight(_spec(tmp_path))
    messages = [str(e) for e in info.value.errors]
    assert any(":1: prompt[0] has role 'x'" in m for m in messages)
    assert any(":2: row has no field 'prompt'" in m for m in messages)
