"""`rlhfspec crd` and `rlhfspec validate` as a user runs them: exit codes and printed lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def rlhfspec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlhfspec_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_crd_prints_the_committed_file() -> None:
    result = rlhfspec("crd")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "crds" / "rlhfjob.yaml").read_text()
    assert yaml.safe_load(result.stdout)["kind"] == "CustomResourceDefinition"


def test_validate_examples_prints_one_summary_line() -> None:
    result = rlhfspec("validate", "examples/tiny-grpo.yaml", "examples/tiny-ppo.yaml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("valid: 2 RLHFJob(s): tiny-grpo (grpo")


def test_validate_lists_every_error_with_file_and_field(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "examples" / "tiny-grpo.yaml").read_text())
    document["spec"]["generation"]["speculative"]["maxDraftTokens"] = 40
    document["spec"]["algorithm"]["name"] = "ppo"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document))
    result = rlhfspec("validate", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        f"{bad}: spec.generation.speculative.maxDraftTokens: 40 is out of range "
        "(an integer 1..16)" in result.stderr.splitlines()
    )


def test_yaml_syntax_error_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("apiVersion: rlhfspec.io/v1alpha1\nspec: [unclosed\n")
    result = rlhfspec("validate", str(bad))
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{bad}:3:1: YAML syntax error:")
    assert "Traceback" not in result.stderr


def test_wrong_kind_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "pod.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    result = rlhfspec("validate", str(bad))
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if not line.startswith("invalid:")]
    assert problems == [
        f"{bad}: apiVersion: 'v1' is not supported (rlhfspec.io/v1alpha1)",
        f"{bad}: kind: 'Pod' is not an RLHFJob (RLHFJob)",
    ]


def test_multi_document_file_names_the_document(tmp_path: Path) -> None:
    good = (ROOT / "examples" / "tiny-grpo.yaml").read_text()
    both = tmp_path / "two.yaml"
    both.write_text(good + "\n---\n" + good.replace("name: tiny-grpo", "name: 9bad"))
    result = rlhfspec("validate", str(both))
    assert result.returncode == 1
    assert f"{both}[doc 2]: metadata.name: '9bad' is not a valid job name" in result.stderr


def test_missing_file_and_usage_errors() -> None:
    result = rlhfspec("validate", "does-not-exist.yaml")
    assert result.returncode == 1
    assert "does-not-exist.yaml: no such file" in result.stderr
    assert rlhfspec().returncode == 2
