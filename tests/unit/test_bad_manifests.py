"""The bad-manifest corpus through `rlhfspec validate`: refused, located, bounded, never a crash.

Every file of ``tests/data/bad-manifests`` is one refusal case; its first line names the field
the error must point at (``# field: spec.x.y``). Large hostile inputs (deep nesting, alias
bombs, a 5000-digit integer, megabyte values) are generated here rather than committed.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from rlhfspec_cli.validate import Summary, validate_files

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "bad-manifests"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))
# An error line holds the file name, the field path, an echo of at most ~130 characters and
# the allowed values; 600 leaves room for long temporary paths.
MAX_LINE = 600
MAX_OUTPUT_PER_FILE = 64 * 1024

HEAD = "apiVersion: rlhfspec.io/v1alpha1\nkind: RLHFJob\nmetadata:\n  name: bad-case\n"
SPEC = "spec:\n  models:\n    policy:\n      path: tiny://policy\n"


def run_validate(*paths: Path) -> tuple[Summary, list[str]]:
    out, err = io.StringIO(), io.StringIO()
    summary = validate_files([str(p) for p in paths], out, err)
    return summary, (out.getvalue() + err.getvalue()).splitlines()


def expected_field(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# field: "), f"{path.name} must start with '# field: <path>'"
    return first.removeprefix("# field: ")


def assert_refused(path: Path, field: str) -> list[str]:
    summary, lines = run_validate(path)
    text = "\n".join(lines)
    assert not summary.ok
    assert "Traceback" not in text and "internal error" not in text, text[:2000]
    problems = [line for line in lines if not line.startswith("invalid:")]
    assert problems, "no problem line"
    named = [line for line in problems if f": {field}" in line]
    assert named, f"no line names {field}: {problems}"
    # What is allowed, in parentheses at the end of the line.
    assert all(line.endswith(")") and " (" in line for line in named), named
    assert all(len(line) <= MAX_LINE for line in lines), max(lines, key=len)[:300]
    assert len(text) <= MAX_OUTPUT_PER_FILE
    assert lines[-1].startswith("invalid: ")
    assert lines[-1].endswith(
        f"(1 files, 0 valid, {summary.invalid} invalid, {summary.unreadable} unreadable)"
    )
    return problems


def test_the_corpus_covers_the_categories() -> None:
    assert len(CORPUS_FILES) >= 50
    names = {p.stem for p in CORPUS_FILES}
    for category in (
        "string-as-",
        "redis-url-",
        "image-",
        "cpu-",
        "memory-",
        "storage-",
        "label-",
        "secret-key-",
        "duplicate-key",
        "name-trailing-newline",
    ):
        assert any(n.startswith(category) for n in names), category


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.stem for p in CORPUS_FILES])
def test_corpus_manifest_is_refused(path: Path) -> None:
    assert_refused(path, expected_field(path))


def _nested(depth: int) -> str:
    return HEAD + SPEC + "  dataset:\n    path: " + "[" * depth + "]" * depth + "\n"


def _bomb(where: str) -> str:
    levels = ["l0: &l0 [" + ", ".join(['"lol"'] * 10) + "]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    flow = "{" + ", ".join(levels) + "}"
    if where == "metadata":
        return (
            HEAD
            + f"  annotations: {flow}\n"
            + SPEC
            + "  dataset:\n    path: tiny://dataset/train.jsonl\n"
        )
    return HEAD + SPEC + f"  dataset:\n    path: {flow}\n"


def _valid_with(line: str) -> str:
    return HEAD + SPEC + "  dataset:\n    path: tiny://dataset/train.jsonl\n" + line


GENERATED: dict[str, tuple[str, Callable[[], str | bytes]]] = {
    "nested-20000-deep": ("spec.dataset.path", lambda: _nested(20_000)),
    "alias-bomb-dataset-path": ("spec.dataset.path", lambda: _bomb("path")),
    "alias-bomb-metadata": ("metadata.annotations", lambda: _bomb("metadata")),
    "integer-5000-digits": (
        "spec.algorithm.seed",
        lambda: _valid_with("  algorithm:\n    seed: " + "7" * 5000 + "\n"),
    ),
    "size-700k-characters": (
        "spec.storage.size",
        lambda: _valid_with("  storage:\n    size: '" + "9" * 700_000 + "Gi'\n"),
    ),
    "path-700k-characters": (
        "spec.storage.path",
        lambda: _valid_with("  storage:\n    path: '/" + "p" * 700_000 + "'\n"),
    ),
    "unknown-key-100k-characters": (
        "spec.",
        lambda: _valid_with("  ? " + "k" * 100_000 + "\n  : 1\n"),
    ),
    "document-over-1.5-mib": (
        "metadata.annotations.a",
        lambda: HEAD + "  annotations:\n    a: '" + "x" * (1600 * 1024) + "'\n" + SPEC,
    ),
}


@pytest.mark.parametrize("case", sorted(GENERATED))
def test_generated_hostile_manifest_is_refused(case: str, tmp_path: Path) -> None:
    field, make = GENERATED[case]
    path = tmp_path / f"{case}.yaml"
    content = make()
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    assert_refused(path, field)


def test_ten_thousand_unknown_keys_give_a_bounded_list(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(_valid_with("".join(f"  junk{i}: 1\n" for i in range(10_000))))
    problems = assert_refused(path, "spec.junk0")
    assert len(problems) == 51
    assert problems[-1].endswith("(document): 9950 more problems not shown")


def test_unreadable_files_are_counted_and_the_rest_checked(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    summary, lines = run_validate(
        binary, tmp_path / "missing.yaml", broken, CORPUS / "cpu-zero.yaml", *EXAMPLES
    )
    assert (summary.files, summary.valid, summary.invalid, summary.unreadable) == (
        3 + 1 + len(EXAMPLES),
        len(EXAMPLES),
        1,
        3,
    )
    assert lines[0] == f"{binary}: cannot read: not UTF-8 text (byte 0)"
    assert lines[-1].endswith(
        f"({summary.files} files, {len(EXAMPLES)} valid, 1 invalid, 3 unreadable)"
    )


def test_examples_still_validate() -> None:
    summary, lines = run_validate(*EXAMPLES)
    assert summary.ok, lines
    assert lines == [lines[0]]
    assert lines[0].startswith(f"valid: {len(EXAMPLES)} RLHFJob(s): ")
    assert lines[0].endswith(
        f"({len(EXAMPLES)} files, {len(EXAMPLES)} valid, 0 invalid, 0 unreadable)"
    )


def _mixed_corpus(directory: Path, count: int) -> tuple[list[Path], int]:
    """``count`` files: renamed copies of the examples, the corpus and generated hostile ones."""
    examples = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    hostile = [
        _bomb("path"),
        _bomb("metadata"),
        _nested(20_000),
        _valid_with("  algorithm:\n    seed: " + "7" * 5000 + "\n"),
    ]
    bad = [p.read_text(encoding="utf-8") for p in CORPUS_FILES] + hostile
    paths: list[Path] = []
    valid = 0
    for index in range(count):
        path = directory / f"m{index:04d}.yaml"
        if index % 2 == 0:
            document = examples[(index // 2) % len(examples)]
            document["metadata"]["name"] = f"job-{index}"
            path.write_text(yaml.safe_dump(document))
            valid += 1
        else:
            path.write_text(bad[(index // 2) % len(bad)], encoding="utf-8")
        paths.append(path)
    return paths, valid


def test_load_check_one_thousand_manifests_in_one_call(tmp_path: Path) -> None:
    paths, valid = _mixed_corpus(tmp_path, 1000)
    tracemalloc.start()
    started = time.perf_counter()
    summary, lines = run_validate(*paths)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert summary.files == 1000
    assert summary.valid == valid
    assert summary.invalid + summary.unreadable == 1000 - valid
    assert not any("internal error" in line or "Traceback" in line for line in lines)
    assert all(len(line) <= MAX_LINE for line in lines)
    print(
        f"\nvalidate: 1000 manifests ({valid} valid) in {seconds:.2f} s, "
        f"peak traced memory {peak / 2**20:.1f} MiB, {len(lines)} output lines"
    )


def test_the_command_over_the_whole_corpus_prints_a_summary_and_fails() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhfspec_cli",
            "validate",
            *map(str, CORPUS_FILES),
            *map(str, EXAMPLES),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    files = len(CORPUS_FILES) + len(EXAMPLES)
    assert last.startswith("invalid: ")
    assert f"({files} files, {len(EXAMPLES)} valid, " in last
