"""Unit tests of the sort-digits task (tiny-model kit's task.py): pure python, fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfspec_workers.tinymodels import task


def test_examples_are_well_formed() -> None:
    for ex in task.make_examples(500, seed=1):
        assert ex.prompt.startswith("S") and ex.prompt.endswith("=")
        digits = ex.prompt[1:-1]
        assert digits.isdigit()
        assert ex.answer == "".join(sorted(digits))
        assert task.MIN_DIGITS <= len(digits) <= task.MAX_DIGITS


def test_lengths_are_long_tailed() -> None:
    # 3 + floor(Exp(mean 6)): median 3 + floor(6 ln 2) = 7, p90 3 + floor(6 ln 10) = 16,
    # p99 3 + floor(6 ln 100) = 30; the cap at 40 binds for ~0.3% of lists.
    lengths = [len(ex.answer) for ex in task.make_examples(20_000, seed=7)]
    assert 6 <= task.quantile(lengths, 0.5) <= 8
    assert 14 <= task.quantile(lengths, 0.9) <= 18
    assert 26 <= task.quantile(lengths, 0.99) <= 34
    assert min(lengths) == 3
    assert max(lengths) == 40
    mean = sum(lengths) / len(lengths)
    assert task.quantile(lengths, 0.5) < mean  # right-skewed
    assert sum(n == 40 for n in lengths) / len(lengths) < 0.01


def test_score_exact_match_only() -> None:
    prompt = "S31415926="
    assert task.answer_for(prompt) == "11234569"
    assert task.score(prompt, "11234569") == 1.0
    # Whitespace and a literal EOS/padding (detokenised with special tokens kept) are ignored.
    assert task.score(prompt, " 11234569\n") == 1.0
    assert task.score(prompt, "11234569<eos>") == 1.0
    assert task.score(prompt, "11234569<eos><pad><pad>") == 1.0
    assert task.score("<bos>" + prompt, "11234569") == 1.0
    for wrong in ("1123456", "112345699", "11234596", "", "11234569x", "1 1234569"):
        assert task.score(prompt, wrong) == 0.0
    # A malformed prompt scores 0 instead of crashing the rollout loop.
    assert task.score("hello", "11234569") == 0.0
    assert task.score("S=", "") == 0.0


def test_make_examples_is_deterministic() -> None:
    assert task.make_examples(300, seed=3) == task.make_examples(300, seed=3)
    assert task.make_examples(300, seed=3) != task.make_examples(300, seed=4)
    # Prefix-stable: a larger set extends a smaller one with the same seed.
    assert task.make_examples(50, seed=3) == task.make_examples(300, seed=3)[:50]


def test_dataset_jsonl_round_trip(tmp_path: Path) -> None:
    path = task.write_dataset_jsonl(tmp_path / "d" / "train.jsonl", 64, seed=5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 64
    assert all(set(r) == {"prompt", "answer"} for r in rows)
    assert task.read_dataset_jsonl(path) == task.make_examples(64, seed=5)
    again = task.write_dataset_jsonl(tmp_path / "again.jsonl", 64, seed=5)
    assert again.read_bytes() == path.read_bytes()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        task.make_prompt("12a")
    with pytest.raises(ValueError):
        task.parse_prompt("S12")
    with pytest.raises(ValueError):
        task.make_examples(-1, seed=0)


def test_task_module_does_not_import_torch() -> None:
    # The rule reward runs in slim processes (and the package import must stay cheap).
    code = (
        "import sys, rlhfspec_workers.tinymodels.task, rlhfspec_workers.tinymodels; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
