"""Rule ``exact_match``: the response is the row's answer, up to case, spacing and a full stop.

Where it sits: ``registry`` scores rollouts with :func:`score` for
``{type: rule, rule: exact_match}`` (short answers: a name, a label, a word). Pure python.
"""

from __future__ import annotations

NAME = "exact_match"
TRAILING_PUNCTUATION = ".,;:!?…。"


def normalize(text: str) -> str:
    """Stripped, casefolded, inner whitespace collapsed to one space, trailing sentence
    punctuation dropped: ``"  The  Answer is Paris. "`` -> ``"the answer is paris"``."""
    collapsed = " ".join(text.casefold().split())
    return collapsed.rstrip(TRAILING_PUNCTUATION).rstrip()


def score(response: str, answer: str | None) -> float:
    """1.0 when the normalised response equals the normalised answer, else 0.0 (also when the
    row has no answer)."""
    if answer is None:
        return 0.0
    return 1.0 if normalize(response) == normalize(answer) else 0.0
