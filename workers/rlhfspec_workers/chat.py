"""Chat prompts: rendering turns with the policy tokenizer's template, and where a reply ends.

Where it sits: below the roles. ``generation.engine.GenerationEngine`` turns a task's chat
messages (or a string prompt, wrapped as one user turn when ``dataset.chatTemplate`` is on) into
prompt token ids with :func:`render`, and adds :func:`end_of_turn_ids` to the stop tokens, so a
reply ends where the template closes an assistant turn (``<|im_end|>`` in ChatML templates) even
when the tokenizer's EOS is another token; ``distill`` renders its prompts and ends its rollouts
the same way. Works on any HF tokenizer object; no vLLM import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

REPLY_MARKER = "RLHFSPECREPLY"


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's template plus the assistant
    header; the template writes its special tokens itself, so none are added on top."""
    rendered = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
    )
    return [int(t) for t in tokenizer.encode(str(rendered), add_special_tokens=False)]


def end_of_turn_ids(tokenizer: Any) -> tuple[int, ...]:
    """The special token that closes an assistant turn, found by rendering a known reply and
    reading the first special token after it; () when the template writes none."""
    try:
        rendered = str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": REPLY_MARKER}],
                tokenize=False,
            )
        )
    except Exception:
        return ()
    if REPLY_MARKER not in rendered:
        return ()
    tail = rendered.split(REPLY_MARKER, 1)[1]
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    special |= {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
    for token in tokenizer.encode(tail, add_special_tokens=False):
        if int(token) in special:
            return (int(token),)
    return ()
