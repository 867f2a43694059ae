"""What every reward shares: the scoring interface, the error that stops a job, the cut-off rule.

Where it sits: below ``registry`` and the reward modules. A :class:`RewardFunction` maps a
batch of rollouts to one float each; :class:`RewardError` is what the inference worker turns
into a ``JobFailure`` (the coordinator fails the job with its field and message).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rlhfspec_workers.messages import Rollout


class RewardFunction(Protocol):
    """Scores a batch of rollouts: one float per rollout, in order."""

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]: ...


class RewardError(Exception):
    """A reward cannot score (a function that does not import, raises or returns the wrong
    thing): the job fails with ``field: message``; nothing is scored 0 in its place."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def unfinished(rollout: Rollout) -> bool:
    """A response cut off by max_tokens never produced its EOS, so it is not an answer (the
    rules score it 0 even when what it has so far happens to be right)."""
    return rollout.finish_reason == "length"
