"""`rlhfspec operator` flags: a scope is required, the chart's flags are accepted."""

from __future__ import annotations

import pytest

from rlhfspec_cli.main import main
from rlhfspec_operator.main import build_parser


def test_operator_needs_a_namespace_or_all_namespaces(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["operator"])
    assert exit_info.value.code == 2
    assert "one of the arguments -n/--namespace -A/--all-namespaces is required" in (
        capsys.readouterr().err
    )


def test_operator_accepts_the_flags_the_helm_chart_passes() -> None:
    args = build_parser().parse_args(
        [
            "--namespace=team-a",
            "--namespace=team-b",
            "--standalone",
            "--liveness=http://0.0.0.0:8080/healthz",
            "--metrics-port=9400",
            "--log-level=debug",
        ]
    )
    assert args.namespaces == ["team-a", "team-b"]
    assert args.metrics_port == 9400 and args.log_level == "DEBUG"
    assert args.peering is None
    peered = build_parser().parse_args(["-A", "--peering=rlhfspec"])
    assert peered.all_namespaces and peered.peering == "rlhfspec"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-A", "--peering=x", "--standalone"])


def test_operator_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["operator", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--namespace", "--all-namespaces", "--liveness", "--peering", "--metrics-port"):
        assert flag in out
