"""Unit tests of the arithmetic word-problem task (data.arithmetic) and `rlhfspec data make`:
pure python, fast."""

from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from rlhfspec_cli.main import main as cli_main
from rlhfspec_workers.data import arithmetic
from rlhfspec_workers.data.arithmetic import LEVELS, Problem, Step, make_examples, make_rows
from rlhfspec_workers.data.arithmetic_wording import FRACTIONS, NAMES, THEMES, template_count

LINE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


def _exact(a: int, op: str, b: int) -> Fraction:
    # Independent of arithmetic.apply: rational arithmetic, so an inexact division shows.
    x, y = Fraction(a), Fraction(b)
    return {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_answers_are_correct_integers_recomputed_from_the_worked_solution(level: str) -> None:
    rows = make_rows(600, seed=3, difficulty=LEVELS[level])
    cap = LEVELS[level].max_value
    for row in rows:
        *lines, final = row["answer"].split("\n")
        assert final.startswith("#### ")
        assert len(lines) == row["ops"] >= 1
        text = row["prompt"][0]["content"]
        value: Fraction | None = None
        for line in lines:
            match = LINE.match(line)
            assert match, line
            a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
            if value is None:
                assert re.search(rf"\b{a}\b", text), (a, text)  # the start is in the prompt
            else:
                assert a == value  # each line continues from the previous result
            value = _exact(a, op, b)
            assert value.denominator == 1 and 1 <= value <= cap and value == c, line
            # Each operand is told in the prompt, as a number or (division) as a fraction.
            assert re.search(rf"\b{b}\b", text) or (op == "/" and FRACTIONS[b] in text), line
        assert value is not None and final == f"#### {int(value)}"


def test_problem_values_and_solution() -> None:
    problem = Problem(12, (Step("+", 6), Step("/", 3), Step("*", 4), Step("-", 5)))
    assert problem.values == (12, 18, 6, 24, 19)
    assert problem.answer == 19
    assert problem.key == "12+6/3*4-5"
    assert problem.solution() == "12 + 6 = 18\n18 / 3 = 6\n6 * 4 = 24\n24 - 5 = 19\n#### 19"
    with pytest.raises(ValueError, match="not an integer"):
        _ = Problem(7, (Step("/", 2),)).values


def test_rows_are_chat_prompts_that_ask_for_the_answer_after_hashes() -> None:
    for row in make_rows(200, seed=1):
        assert set(row) == {"id", "prompt", "answer", "ops"}
        assert isinstance(row["prompt"], list) and len(row["prompt"]) == 1
        message = row["prompt"][0]
        assert message["role"] == "user"
        assert "####" in message["content"]
        assert "{" not in message["content"] and "}" not in message["content"]
    ids = [row["id"] for row in make_rows(50, seed=1)]
    assert len(set(ids)) == 50 and ids[0] == "arith-train-1-00000"


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    assert make_rows(300, seed=5) == make_rows(300, seed=5)
    assert make_rows(100, seed=5, split="eval") == make_rows(100, seed=5, split="eval")
    # A prefix: asking for more rows does not change the first ones.
    assert make_rows(120, seed=5)[:80] == make_rows(80, seed=5)
    a = [r["prompt"] for r in make_rows(100, seed=5)]
    b = [r["prompt"] for r in make_rows(100, seed=6)]
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 5


def test_operation_counts_are_long_tailed() -> None:
    counts = Counter(len(e.problem.steps) for e in make_examples(1500, seed=2))
    shares = {k: counts[k] / 1500 for k in (1, 2, 3, 4)}
    assert set(counts) == {1, 2, 3, 4}
    assert shares[1] > shares[2] > shares[3] > shares[4] > 0.01
    assert shares[1] + shares[2] > 0.75
    ops = Counter(s.op for e in make_examples(1500, seed=2) for s in e.problem.steps)
    assert set(ops) == {"+", "-", "*", "/"}
    # Response lengths follow: the worked solution has one line per operation.
    lengths = sorted(len(r["answer"]) for r in make_rows(1500, seed=2))
    assert lengths[int(0.9 * len(lengths))] > 2 * lengths[len(lengths) // 2]


def test_wording_is_varied() -> None:
    examples = make_examples(1000, seed=4)
    used = Counter(t for e in examples for t in e.templates)
    assert len(used) >= 120 and template_count() >= 150
    # No sentence template dominates: the commonest is under 5% of all sentences told.
    assert used.most_common(1)[0][1] < 0.05 * sum(used.values())
    themes = Counter(e.theme for e in examples)
    assert set(themes) == {t.name for t in THEMES}
    # Masking numbers, names and nouns leaves many distinct prompts, not a handful.
    words = sorted({*NAMES, *(n for t in THEMES for n in t.nouns if n.strip("$"))}, key=len)
    mask = re.compile("|".join(re.escape(w) for w in reversed(words)) + r"|\$?\d+")
    skeletons = {mask.sub("_", e.text) for e in examples}
    assert len(skeletons) > 400
    first_words = Counter(e.text.split()[0] for e in examples)
    assert first_words.most_common(1)[0][1] < 0.2 * len(examples)


@pytest.mark.parametrize("seed", [0, 1])
def test_train_and_eval_never_share_a_problem(seed: int) -> None:
    train = make_examples(1200, seed=seed)
    held_out = make_examples(200, seed=seed, split="eval")
    assert {e.problem.key for e in train}.isdisjoint({e.problem.key for e in held_out})
    # Not by luck: every split is fixed by the problem's numbers, whatever the seed.
    assert all(arithmetic.split_of(e.problem) == "train" for e in train)
    assert all(arithmetic.split_of(e.problem) == "eval" for e in held_out)
    # Within a split the same numbers never come back in the same theme.
    told = [(e.problem.key, e.theme) for e in train]
    assert len(told) == len(set(told))


def test_too_many_rows_for_the_difficulty_is_an_error() -> None:
    tiny = arithmetic.Difficulty(op_count_weights=(1.0,), start=(2, 3), addend=(2, 2))
    with pytest.raises(ValueError, match="distinct train problems"):
        make_rows(500, difficulty=tiny)


def test_data_make_arithmetic_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, held = tmp_path / "d" / "train.jsonl", tmp_path / "eval.jsonl"
    argv = ["data", "make", "arithmetic", "--out", str(out), "--n", "40", "--seed", "7",
            "--eval-out", str(held), "--eval-n", "12"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "40 train rows" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == make_rows(40, seed=7)
    assert [json.loads(line) for line in held.read_text().splitlines()] == make_rows(
        12, seed=7, split="eval"
    )
    assert cli_main(["data", "make", "arithmetic", "--out", str(out), "--n", "0"]) == 2


def test_example_files_are_the_generators_rows() -> None:
    # `rlhfspec data make arithmetic --out examples/data/arith-train.jsonl --n 1000
    #  --eval-out examples/data/arith-eval.jsonl --eval-n 128` (what bench learning trains on).
    data = Path(__file__).resolve().parents[2] / "examples" / "data"
    for name, rows in (
        ("arith-train.jsonl", make_rows(1000, seed=0)),
        ("arith-eval.jsonl", make_rows(128, seed=0, split="eval")),
    ):
        assert [json.loads(line) for line in (data / name).read_text().splitlines()] == rows
