"""Bounded YAML loading and bounded echoes: hostile input is refused early, with a location."""

from __future__ import annotations

import pytest
import yaml

from rlhfspec_api.bounded_yaml import (
    MAX_DEPTH,
    MAX_DOCUMENT_CHARS,
    MAX_NODES,
    InputRefused,
    load_all,
)
from rlhfspec_api.echo import ECHO_CHARS, MAX_MESSAGE_CHARS, cap, echo, key_text


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """The classic alias bomb: each level a list of ``width`` aliases of the previous one."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for level in range(1, levels):
        aliases = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{aliases}]")
    return "\n".join(lines) + "\n"


def refused(text: str) -> InputRefused:
    with pytest.raises(InputRefused) as info:
        load_all(text)
    return info.value


def test_deep_flow_nesting_is_refused_at_the_limit() -> None:
    error = refused("a: " + "[" * 20_000 + "]" * 20_000)
    assert "nested too deeply" in error.problem
    assert str(MAX_DEPTH) in error.allowed
    # Refused by the scanner, which counts brackets before the composer builds the path.
    assert error.path == "a"


def test_deep_block_nesting_is_refused() -> None:
    text = "a:\n" + "".join("  " * i + "-\n" for i in range(1, 200))
    assert "nested too deeply" in refused(text).problem


def test_nesting_within_the_limit_loads() -> None:
    depth = MAX_DEPTH - 1
    (document,) = load_all("[" * depth + "1" + "]" * depth)
    assert isinstance(document, list)


def test_alias_bomb_is_refused_with_its_path() -> None:
    text = "spec:\n  dataset:\n    path: {" + billion_laughs().replace("\n", ", ").strip(", ") + "}"
    error = refused(text)
    assert error.problem.startswith("excessive aliasing")
    assert error.path.startswith("spec.dataset.path.")
    assert error.mark is not None


def test_alias_bomb_under_metadata_is_refused() -> None:
    body = "\n".join("    " + line for line in billion_laughs().splitlines())
    text = "metadata:\n  name: x\n  annotations:\n" + body + "\n"
    error = refused(text)
    assert error.problem.startswith("excessive aliasing")
    assert error.path.startswith("metadata.annotations")


def test_modest_aliasing_is_allowed() -> None:
    (document,) = load_all("base: &b {cpu: 1, memory: 2Gi}\nx: *b\ny: *b\n")
    assert document == {
        "base": {"cpu": 1, "memory": "2Gi"},
        "x": {"cpu": 1, "memory": "2Gi"},
        "y": {"cpu": 1, "memory": "2Gi"},
    }


def test_too_many_nodes_without_aliases() -> None:
    text = "[" + ",".join(["1"] * (MAX_NODES + 1)) + "]"
    error = refused(text)
    assert "too many elements" in error.problem


def test_recursive_alias_is_refused() -> None:
    assert "contains it" in refused("a: &a [1, *a]\n").problem


def test_5000_digit_integer_is_refused_not_converted() -> None:
    error = refused("spec:\n  seed: " + "9" * 5000 + "\n")
    assert error.path == "spec.seed"
    assert "5000 characters" in error.problem


def test_duplicate_key_is_refused_with_its_path() -> None:
    error = refused("spec:\n  image: a\n  image: b\n")
    assert error.path == "spec.image"
    assert error.problem == "key appears twice in this mapping"


def test_merge_keys_may_be_overridden() -> None:
    (document,) = load_all("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n")
    assert document == {"base": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}}


def test_document_size_limit() -> None:
    error = refused("a: " + "x" * (MAX_DOCUMENT_CHARS + 10) + "\n")
    assert "too large" in error.problem


def test_json_like_construction() -> None:
    (document,) = load_all("1: one\ndate: 2024-01-01\nflag: true\n")
    assert document == {"1": "one", "date": "2024-01-01", "flag": True}


@pytest.mark.parametrize("text", ["a: !!binary aGVsbG8=", "a: !!set {x}", "? [x]\n: 1"])
def test_non_json_input_is_a_yaml_error(text: str) -> None:
    with pytest.raises(yaml.MarkedYAMLError):
        load_all(text)


def test_error_path_cuts_long_keys() -> None:
    # An explicit key ("? ") may be any length; the duplicate below it is reported under it.
    error = refused("? " + "k" * 100_000 + "\n:\n  a: 1\n  a: 2\n")
    assert len(error.path) < 200


def test_echo_bounds_strings_and_says_how_long() -> None:
    text = echo("x" * 700_000)
    assert text.endswith("…' (700000 characters)")
    assert len(text) < ECHO_CHARS + 40


def test_echo_never_expands_shared_structures() -> None:
    # What a billion-laughs document would construct: 10^9 leaves through shared lists.
    value: object = ["lol"] * 10
    for _ in range(8):
        value = [value] * 10
    text = echo(value)
    assert len(text) < ECHO_CHARS + 40
    assert "list of 10 items" in text


def test_echo_describes_huge_integers_and_escapes_control_characters() -> None:
    assert echo(10**5000) == "<an integer of about 5001 digits>"
    assert echo("a\nb\x00") == "'a\\nb\\x00'"
    assert echo(True) == "true" and echo(None) == "null"


def test_key_text_and_cap() -> None:
    assert key_text("a" * 100).endswith("…")
    assert key_text("a\nb") == "'a\\nb'"
    message = cap("y" * 10_000)
    assert len(message) == MAX_MESSAGE_CHARS
    assert message.endswith("more characters)")
    assert cap("short") == "short"
