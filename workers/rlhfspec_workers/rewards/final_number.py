"""Rule ``final_number``: the last number of the response equals the row's answer.

Where it sits: ``registry`` scores rollouts with :func:`score` for
``{type: rule, rule: final_number}``; chat models usually end a worked answer with the result.
Simpler than ``math_answer`` (no ``####`` or ``\\boxed{}``, no fractions). Pure python.
"""

from __future__ import annotations

import re

NAME = "final_number"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators dropped), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def score(response: str, answer: str | None) -> float:
    """1.0 when the last number of ``response`` equals the last number of ``answer`` (as
    numbers: "42", "42.0" and "42." all match 42), else 0.0 (also when either has none)."""
    want = last_number(answer or "")
    got = last_number(response)
    return 1.0 if want is not None and got is not None and got == want else 0.0
