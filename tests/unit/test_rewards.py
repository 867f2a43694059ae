"""The reward modules and their registry: each rule's scoring, weighted sums, function rewards
and how they fail (a RewardError naming the field and the function, never a silent 0)."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlhfspec_api.rewards import RewardRule, RewardSpec, RewardType
from rlhfspec_workers.messages import ChatMessage, Rollout
from rlhfspec_workers.rewards import (
    RewardError,
    exact_match,
    final_number,
    math_answer,
    regex,
    sort_digits,
)
from rlhfspec_workers.rewards.function import FunctionReward, import_function
from rlhfspec_workers.rewards.registry import build_reward, rule_reward


def _rollout(text: str, answer: str | None = None, **changes: Any) -> Rollout:
    fields: dict[str, Any] = dict(
        iteration=1, sample_id="it1/p0/0", prompt_id="p0", group_id="g0", sample_index=0,
        prompt="q", answer=answer, prompt_token_ids=[1], token_ids=[2], logprobs=[-0.1],
        text=text, finish_reason="stop", weight_version=0, worker="w",
    )  # fmt: skip
    fields.update(changes)
    return Rollout(**fields)


# -- math_answer ------------------------------------------------------------------------------

GSM8K_SOLUTION = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"


@pytest.mark.parametrize(
    ("response", "answer", "want"),
    [
        ("She sold 48+24 = 72 clips.\n#### 72", GSM8K_SOLUTION, 1.0),
        ("#### 71", GSM8K_SOLUTION, 0.0),
        ("The answer is 72.", "72", 1.0),  # no marker, no box: the last number
        ("First 72, then 71", "72", 0.0),
        ("#### 72\nbut maybe 5", "72", 1.0),  # the marker wins over later numbers
        ("So \\boxed{72} apples, 3 each", "72", 1.0),  # the box wins over later numbers
        ("\\boxed{1} then \\boxed{72}", "72", 1.0),  # the last box
        ("It costs $1,234.", "1234", 1.0),
        ("It costs 1,234 dollars", "#### 1,234", 1.0),
        ("#### $12", "12", 1.0),
        ("That is 12%", "12", 1.0),
        ("#### 12.0", "12", 1.0),
        ("#### 12.", "12", 1.0),
        ("#### 12.5", "12", 0.0),
        ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
        ("#### 3/4", "0.75", 1.0),
        ("\\boxed{-\\dfrac{1}{2}}", "-0.5", 1.0),
        ("The change is -5.", "-5", 1.0),
        ("3-5", "-5", 0.0),  # a subtraction, not a negative 5
        ("\\boxed{1{,}000}", "1000", 1.0),
        ("\\boxed{\\$18.00}", "18", 1.0),
        ("\\boxed{B}", "b", 1.0),  # not a number: compared as text
        ("\\boxed{B}", "C", 0.0),
        ("no number at all", "5", 0.0),
        ("####", "5", 0.0),  # a marker with nothing after it is no answer
        ("#### 1/0", "1", 0.0),
        ("#### 5", None, 0.0),
    ],
)
def test_math_answer(response: str, answer: str | None, want: float) -> None:
    assert math_answer.score(response, answer) == want


def test_math_answer_extraction_and_numbers() -> None:
    assert math_answer.final_answer(GSM8K_SOLUTION) == "72"
    assert math_answer.last_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert math_answer.last_boxed("\\boxed{unclosed") is None
    assert math_answer.to_number("$1,234.50 dollars") == 1234.5
    assert math_answer.to_number("none") is None


# -- the other rules --------------------------------------------------------------------------


def test_exact_match_normalises_case_space_and_trailing_punctuation() -> None:
    assert exact_match.normalize("  The   Answer\nis Paris. ") == "the answer is paris"
    assert exact_match.score("PARIS!", "Paris") == 1.0
    assert exact_match.score("Paris, France", "Paris") == 0.0
    assert exact_match.score("Paris", None) == 0.0


def test_regex_is_a_format_reward_searched_across_lines() -> None:
    pattern = regex.compile_pattern(r"<think>.*</think>\s*\S")
    assert regex.score("<think>a\nb</think> 42", pattern) == 1.0
    assert regex.score("<think>a\nb</think>", pattern) == 0.0
    assert regex.score("xx42yy", r"\d+") == 1.0


def test_sort_digits_scores_exactly_as_the_tiny_task_does() -> None:
    from rlhfspec_workers.tinymodels import task

    rng = random.Random(0)
    cases = [("S31415926=", "11234569"), ("<bos>S21=", "12<eos><pad>"), ("S21=", " 12 "),
             ("S21=", "21"), ("X21=", "12"), ("S=", ""), ("S2a=", "2a")]  # fmt: skip
    for _ in range(200):
        example = task.random_example(rng)
        wrong = "".join(rng.sample(example.answer, len(example.answer)))
        cases += [(example.prompt, example.answer), (example.prompt, wrong + "<eos>")]
    for prompt, response in cases:
        assert sort_digits.score(prompt, response) == task.score(prompt, response), (
            prompt,
            response,
        )
    assert sum(sort_digits.score(p, r) for p, r in cases) > 200


def test_final_number_reads_the_last_number() -> None:
    assert final_number.last_number("17 + 25 = 42.") == 42.0
    assert final_number.score("The answer is 42.0", "42") == 1.0
    assert final_number.score("First 42, then 41", "42") == 0.0


# -- the registry -----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RewardRule))
def test_every_rule_scores_a_cut_off_response_zero(rule: RewardRule) -> None:
    pattern = r"\d" if rule is RewardRule.REGEX else None
    reward = rule_reward(rule, pattern)
    right = _rollout("11234569", "11234569", prompt="S31415926=")
    cut = right.model_copy(update={"finish_reason": "length"})
    assert reward([right, cut]) == [1.0, 0.0]


def test_terms_are_summed_with_their_weights() -> None:
    terms = [
        ("spec.rewards[0]", RewardSpec(rule=RewardRule.MATH_ANSWER)),
        ("spec.rewards[1]", RewardSpec(rule=RewardRule.REGEX, pattern="####", weight=0.25)),
        ("spec.rewards[2]", RewardSpec(rule=RewardRule.EXACT_MATCH, weight=-2.0)),
    ]
    reward = build_reward(terms, {})
    rollouts = [_rollout("#### 7", "7"), _rollout("7", "7"), _rollout("8", "7")]
    assert reward(rollouts) == [1.25, 1.0 - 2.0, 0.0]
    assert reward.by_term(rollouts)["spec.rewards[1]"] == [1.0, 0.0, 0.0]
    assert reward([]) == []


# -- function rewards -------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of reward functions in a directory on sys.path (a unique name per test)."""
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            calls = []

            def length(prompts, responses, answers, metadata):
                calls.append((prompts, responses, answers, metadata))
                return [float(len(r)) for r in responses]

            def boom(prompts, responses, answers, metadata):
                raise ValueError("no answer key in row")

            def short(prompts, responses, answers, metadata):
                return [1.0]

            def nan(prompts, responses, answers, metadata):
                return [float("nan")] * len(responses)

            def nothing(prompts, responses, answers, metadata):
                return [None] * len(responses)

            def text(prompts, responses, answers, metadata):
                return "1.0"

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_function_gets_prompts_responses_answers_and_metadata(user_module: str) -> None:
    chat = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="q")]
    rollouts = [
        _rollout("abc", "1", messages=chat, metadata={"level": 3}),
        _rollout("de", None, prompt="plain", sample_id="it1/p1/0", finish_reason="length"),
    ]
    reward = FunctionReward(f"{user_module}:length", "spec.reward.function")
    assert reward(rollouts) == [3.0, 2.0]  # no zero for the cut-off one: the function decides
    prompts, responses, answers, metadata = sys.modules[user_module].calls[-1]
    assert prompts == [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}],
        "plain",
    ]
    assert responses == ["abc", "de"] and answers == ["1", None]
    assert metadata[0] == {
        "level": 3, "sample_id": "it1/p0/0", "group_id": "g0", "finish_reason": "stop",
    }  # fmt: skip
    assert metadata[1]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("boom", "{m}:boom raised ValueError: no answer key in row"),
        ("short", "{m}:short returned 1 scores for 2 responses"),
        ("nan", "{m}:nan returned nan for response 0 (sample it1/p0/0)"),
        ("nothing", "{m}:nothing returned None for response 0, not a number"),
        ("text", "{m}:text returned str, not a list of 2 floats"),
    ],
)
def test_a_failing_function_raises_naming_field_and_function(
    user_module: str, function: str, message: str
) -> None:
    reward = build_reward(
        [
            (
                "spec.rewards[1]",
                RewardSpec(type=RewardType.FUNCTION, function=f"{user_module}:{function}"),
            )
        ],
        {},
    )
    with pytest.raises(RewardError) as info:
        reward([_rollout("a"), _rollout("b")])
    assert info.value.field == "spec.rewards[1].function"
    assert info.value.message == message.format(m=user_module)


def test_import_problems_name_the_field_and_the_cause(user_module: str) -> None:
    field = "spec.reward.function"
    with pytest.raises(RewardError, match=r"cannot import 'no_such_mod_x' .*ModuleNotFoundError"):
        import_function("no_such_mod_x:fn", field)
    with pytest.raises(RewardError, match=rf"{user_module}:missing: module .* has no 'missing'"):
        import_function(f"{user_module}:missing", field)
    with pytest.raises(RewardError, match=r"is a int, not a callable"):
        import_function(f"{user_module}:NOT_CALLABLE", field)
    assert callable(import_function(f"{user_module}:length", field))


def test_a_module_in_the_current_directory_imports_as_with_python_c(tmp_path: Path) -> None:
    """A console script (``rlhfspec``) has no current directory on sys.path; python -c has."""
    (tmp_path / "cwd_rewards.py").write_text("def score(p, r, a, m):\n    return [1.0] * len(r)\n")
    code = (
        "import sys; sys.path = [p for p in sys.path if p not in ('', sys.argv[1])]\n"
        "from rlhfspec_workers.rewards.function import import_function\n"
        "print(import_function('cwd_rewards:score', 'f')(['p'], ['r'], [None], [{}]))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1.0]"


def test_rule_rewards_import_neither_torch_nor_the_tiny_kit() -> None:
    code = (
        "import sys\n"
        "from rlhfspec_api.rewards import RewardRule, RewardSpec\n"
        "from rlhfspec_workers.rewards.registry import build_reward\n"
        "import rlhfspec_workers.preflight\n"
        "r = build_reward([('spec.reward', RewardSpec(rule=RewardRule.SORT_DIGITS))], {})\n"
        "heavy = [m for m in ('torch', 'transformers', 'rlhfspec_workers.tinymodels')\n"
        "         if m in sys.modules]\n"
        "print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_nonfinite_term_scores_are_refused_by_the_sum() -> None:
    from rlhfspec_workers.rewards.registry import Term, WeightedReward

    reward = WeightedReward([Term("spec.reward", "model", 1.0, lambda rs: [math.inf] * len(rs))])
    with pytest.raises(RewardError, match=r"spec\.reward: model scored a response inf"):
        reward([_rollout("a")])
