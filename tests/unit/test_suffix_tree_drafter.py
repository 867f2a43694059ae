"""The suffix_tree drafter (Arctic Inference's suffix tree behind our Drafter protocol): what it
drafts from, how long its history lasts, and the error when the library is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from rlhfspec_api.generation import SpeculativeSpec
from rlhfspec_workers.drafters import registry
from rlhfspec_workers.drafters.base import DraftRow
from rlhfspec_workers.drafters.suffix_tree import SuffixTreeDrafter

PROMPT = [1, 2, 3]


def row(req: str, output: list[int], prompt: list[int] = PROMPT, max_k: int = 8) -> DraftRow:
    """A row of prompt group ``g``."""
    tokens = np.asarray(prompt + output, dtype=np.int64)
    return DraftRow(req, tokens, len(prompt), group="g", max_k=max_k)


def test_drafts_what_a_sibling_generated_after_the_same_context() -> None:
    drafter = SuffixTreeDrafter()
    sibling = [40, 41, 42, 43, 44, 45]
    drafter.observe([row("a", sibling)])
    [draft] = drafter.propose([row("b", [40, 41, 42])], k=3)
    assert draft == [43, 44, 45]


def test_a_request_drafts_from_its_own_prompt() -> None:
    drafter = SuffixTreeDrafter()
    prompt = [7, 8, 9, 10, 11, 12]
    [draft] = drafter.propose([row("a", [50, 7, 8, 9], prompt=prompt)], k=2)
    assert draft == [10, 11]


def test_respects_each_rows_max_k_and_proposes_nothing_without_a_match() -> None:
    drafter = SuffixTreeDrafter()
    drafter.observe([row("a", [40, 41, 42, 43, 44, 45])])
    capped, nothing, unmatched = drafter.propose(
        [row("b", [40, 41, 42], max_k=1), row("c", [40, 41], max_k=0), row("d", [90, 91])],
        k=4,
    )
    assert capped == [43]
    assert nothing == []
    assert unmatched == []


def test_history_lasts_history_iterations_then_leaves_the_tree() -> None:
    drafter = SuffixTreeDrafter(history_iterations=1)
    drafter.observe([row("a", [60, 61, 62, 63, 64])])
    drafter.release(["a"])
    drafter.new_iteration()  # iteration 1's response is now history
    assert drafter.propose([row("b", [60, 61, 62])], k=2) == [[63, 64]]
    drafter.release(["b"])
    drafter.new_iteration()
    drafter.new_iteration()  # two iterations later it is gone
    assert drafter.propose([row("c", [60, 61, 62])], k=2) == [[]]


def test_rollouts_from_elsewhere_are_drafted_from() -> None:
    drafter = SuffixTreeDrafter()
    drafter.add_history("g", [[70, 71, 72, 73, 74]])
    assert drafter.propose([row("a", [70, 71, 72])], k=2) == [[73, 74]]


def test_a_reused_request_id_keeps_the_earlier_response_in_the_tree() -> None:
    drafter = SuffixTreeDrafter()
    drafter.observe([row("a", [80, 81, 82, 83, 84])])
    drafter.new_iteration()
    drafter.observe([row("a", [90, 91])])  # the same engine id in the next iteration
    assert drafter.propose([row("b", [80, 81, 82])], k=2) == [[83, 84]]


def test_drafts_only_from_the_rows_own_prompt_group() -> None:
    drafter = SuffixTreeDrafter()
    drafter.observe([row("a", [40, 41, 42, 43, 44, 45])])
    other = DraftRow("b", np.asarray([*PROMPT, 40, 41, 42]), len(PROMPT), group="h", max_k=8)
    assert drafter.propose([other], k=3) == [[]]


def test_missing_library_is_a_field_error_before_any_engine_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "arctic_inference.suffix_decoding", None)
    spec = SpeculativeSpec.model_validate({"drafters": [{"method": "suffix_tree"}]})
    with pytest.raises(registry.DrafterConfigError) as raised:
        registry.check(spec, Path("/nonexistent"), {}, device="cpu")
    [error] = raised.value.errors
    assert error.path == "generation.speculative.drafters[0].method"
    assert "suffix_tree cannot run on this install" in str(error)
    assert "arctic-inference suffix tree" in str(error)
