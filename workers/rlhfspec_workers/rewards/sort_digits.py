"""Rule ``sort_digits``: the tiny kit's task (sort a list of digits), scored exactly.

Where it sits: ``registry`` scores rollouts with :func:`score` when a job's reward is
``{type: rule, rule: sort_digits}`` (the default). The one scorer of the task: the tiny kit's
``tinymodels.task.score`` calls it, and nothing here imports the kit, so the inference path
never loads it. Pure python.

A prompt is ``S`` + digits + ``=`` (``S31415926=``, a leading ``<bos>`` tolerated); the answer
is the digits sorted (``11234569``).
"""

from __future__ import annotations

NAME = "sort_digits"
PROMPT_PREFIX = "S"
PROMPT_SUFFIX = "="
DIGITS = frozenset("0123456789")
# Literal special-token strings a response may carry when detokenised without skipping them.
TRAILING_SPECIALS = ("<eos>", "<pad>")


def sorted_digits(prompt: str) -> str | None:
    """The reference answer of a task prompt (its digits, sorted), or None if the prompt is
    not ``S<digits>=``."""
    text = prompt.strip().removeprefix("<bos>")
    if not (text.startswith(PROMPT_PREFIX) and text.endswith(PROMPT_SUFFIX)):
        return None
    digits = text[len(PROMPT_PREFIX) : -len(PROMPT_SUFFIX)]
    if not digits or any(c not in DIGITS for c in digits):
        return None
    return "".join(sorted(digits))


def clean_response(response: str) -> str:
    """``response`` without surrounding whitespace and trailing literal ``<eos>``/``<pad>``."""
    text = response.strip()
    changed = True
    while changed:
        changed = False
        for special in TRAILING_SPECIALS:
            if text.endswith(special):
                text = text[: -len(special)].rstrip()
                changed = True
    return text


def score(prompt: str, response: str) -> float:
    """1.0 when ``response`` is exactly the prompt's digits sorted, else 0.0.

    Surrounding whitespace and trailing literal ``<eos>``/``<pad>`` are ignored, so the score
    does not depend on whether the response was detokenised with special tokens. A prompt
    that is not a task prompt scores 0.0 (a rule never raises).
    """
    reference = sorted_digits(prompt)
    if reference is None:
        return 0.0
    return 1.0 if clean_response(response) == reference else 0.0
