"""What a dead letter records about a stream entry nobody can use.

Where it sits: under ``runtime.Bus``. Every read of a stream decodes each entry as its
``messages`` model; one that does not decode (not JSON, another kind, another schema version,
a field out of range) is never guessed at: the bus publishes the :class:`DeadLetter` built
here to ``Keys.dead_letters`` and logs it. The sample id, read best effort from the payload,
lets an operator find which rollout went missing.
"""

from __future__ import annotations

import json

from rlhfspec_workers.messages import DeadLetter


def dead_letter_of(stream: str, entry_id: str, raw: bytes | str, reason: str) -> DeadLetter:
    """The dead letter of entry ``entry_id`` of ``stream`` whose payload ``raw`` failed with
    ``reason`` (bytes that are not UTF-8 are kept with replacement characters)."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return DeadLetter(
        source_stream=stream,
        entry_id=entry_id,
        sample_id=_sample_id_of(text),
        reason=reason,
        raw=text,
    )


def _sample_id_of(text: str) -> str | None:
    """Best effort: the sample id of a payload that failed validation (a task's or a
    rollout's, also when the rollout is wrapped, as an experience wraps it)."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if isinstance(body, dict):
        for holder in (body, body.get("rollout")):
            if isinstance(holder, dict) and isinstance(holder.get("sample_id"), str):
                return str(holder["sample_id"])
    return None
