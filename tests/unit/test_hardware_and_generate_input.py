"""The dtype rule (`generation.dtype: auto`), the final_number reward, and the bad input of
`rlhfspec generate`, which must be reported before any engine starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfspec_api.generation import EngineDType
from rlhfspec_api.rewards import RewardRule
from rlhfspec_workers import hardware
from rlhfspec_workers.generation.offline import PromptsError, read_prompts
from rlhfspec_workers.messages import Rollout
from rlhfspec_workers.rewards.final_number import last_number
from rlhfspec_workers.rewards.registry import rule_reward

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        ({"avx2", "avx512f"}, "float32"),
        ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
        ({"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),
        (set(), "float32"),
    ],
)
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], want: str
) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.resolve_engine_dtype(EngineDType.AUTO, "cpu") == want
    # An explicit dtype is never second-guessed.
    assert hardware.resolve_engine_dtype("float16", "cpu") == "float16"


def test_cpu_flags_come_from_this_machine() -> None:
    flags = hardware.cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert flags, "no flags line parsed from /proc/cpuinfo"
    machine = hardware.describe_machine()
    assert machine.startswith(hardware.cpu_model())
    assert f"{hardware.available_cores()} cores" in machine
    assert ("no amx" in machine) == ("amx_bf16" not in flags)
    assert machine.split("; ")[1].startswith(("cpu", "cuda"))


def _rollout(text: str, answer: str, finish: str = "stop") -> Rollout:
    return Rollout(
        iteration=1, sample_id="s", prompt_id="p", group_id="g", sample_index=0,
        prompt="q", answer=answer, prompt_token_ids=[1], token_ids=[2], logprobs=[-0.1],
        text=text, finish_reason=finish, weight_version=0, worker="w",
        num_draft_tokens=0, num_accepted_tokens=0,
    )  # fmt: skip


def test_final_number_reward_reads_the_last_number() -> None:
    assert last_number("17 + 25 = 42.") == 42.0
    assert last_number("It costs 1,250 dollars") == 1250.0
    assert last_number("no digits here") is None
    reward = rule_reward(RewardRule.FINAL_NUMBER)
    scores = reward(
        [
            _rollout("17 + 25 = 42", "42"),
            _rollout("The answer is 42.0", "42"),
            _rollout("First 42, then 41", "42"),  # the last number counts
            _rollout("17 + 25 = 42", "42", finish="length"),  # cut off: not an answer
            _rollout("-8", "-8"),
        ]
    )
    assert scores == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_prompts_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"question": "b"}\nnot json\n{"prompt": 3}\n')
    with pytest.raises(PromptsError) as err:
        read_prompts(path, "prompt")
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{path}:3: row has no field 'prompt'")
    assert "spec.dataset.promptField" in lines[0]
    assert lines[1].startswith(f"{path}:4: not JSON")
    assert lines[2].startswith(f"{path}:5: prompt is int")
    path.write_text('{"prompt": "a", "id": "x"}\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    got = read_prompts(path, "prompt")
    assert [(pid, row.prompt) for pid, row in got] == [("x", "a"), ("p2", "b")]
    assert got[1][1].messages is not None and got[1][1].messages[0].role == "user"


def _generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", "generate", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def test_generate_rejects_bad_input_before_any_engine_starts(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question": "What is 2+2?"}\n')
    out = tmp_path / "out.jsonl"
    manifest = str(ROOT / "examples" / "tiny-grpo.yaml")
    result = _generate(manifest, "--prompts", str(prompts), "--out", str(out))
    assert result.returncode == 1
    assert f"{prompts}:1: row has no field 'prompt'" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
    # A flag lands in the spec and is checked like the manifest field it overrides.
    result = _generate(manifest, "--prompts", str(prompts), "--out", str(out),
                       "--temperature", "-1")  # fmt: skip
    assert result.returncode == 1
    assert "spec.generation.temperature" in result.stderr
    # A model directory that is not one.
    job = (ROOT / "examples" / "tiny-grpo.yaml").read_text()
    bad = tmp_path / "job.yaml"
    bad.write_text(job.replace("path: tiny://policy", f"path: {tmp_path / 'nothing'}"))
    prompts.write_text(json.dumps({"prompt": "S3=", "answer": "3"}) + "\n")
    result = _generate(str(bad), "--prompts", str(prompts), "--out", str(out))
    assert result.returncode == 1
    assert "spec.models.policy.path" in result.stderr and "no such directory" in result.stderr
    assert not out.exists()
