"""``--profile-rounds`` of ``rlhfspec bench generation`` and ``selector-batches``: parsed into
the benchmark's settings, and refused below 1 with the flag named."""

from __future__ import annotations

import pytest

from rlhfspec_workers.benchmarks import selector_batches
from rlhfspec_workers.benchmarks.cli import _workload_flags, build_parser
from rlhfspec_workers.benchmarks.workload import Settings


def test_generation_takes_profile_rounds_and_refuses_zero(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["generation", "--profile-rounds", "6"])
    assert _workload_flags(args)["profile_rounds"] == 6
    plain = build_parser().parse_args(["generation"])
    assert _workload_flags(plain)["profile_rounds"] is None  # the default stands
    assert Settings().profile_rounds == 4
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generation", "--profile-rounds", "0"])
    assert "--profile-rounds: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_selector_batches_refuses_zero_profile_rounds_before_starting_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert selector_batches.main(["--profile-rounds", "0", "--out", "/nonexistent"]) == 2
    assert "--profile-rounds must be >= 1" in capsys.readouterr().out
