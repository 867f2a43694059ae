"""The "off" drafter: no draft tokens (k = 0), i.e. plain decoding for the step.

Where it sits: the policy may choose it every step inside the adaptive proposer (large
batches, where verification is compute-bound and drafts only cost); as a whole-engine mode
(``speculative.mode: off``) it means no speculative config at all, so vLLM runs no proposer
and no rejection sampler (the engine passes None; so does ``registry.native_config``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rlhfspec_workers.spec_decode.cost_records import OFF

from .base import BuildContext, DrafterEntry, DraftRow, NativeContext

NAME = OFF


class OffDrafter:
    name = NAME

    def propose(self, rows: Sequence[DraftRow], k: int) -> list[list[int]]:
        return [[] for _ in rows]

    def release(self, req_ids: Iterable[str]) -> None:
        pass


def _build(context: BuildContext) -> OffDrafter:
    return OffDrafter()


def _native(context: NativeContext) -> None:
    return None  # no speculative config at all: no proposer, no rejection sampler


ENTRY = DrafterEntry(NAME, build=_build, native=_native)
