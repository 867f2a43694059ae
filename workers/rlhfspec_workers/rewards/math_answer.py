"""Rule ``math_answer``: the response's final answer equals the row's answer, as a number.

Where it sits: ``registry`` scores rollouts with :func:`score` for
``{type: rule, rule: math_answer}`` (GSM8K-style word problems and the like). Pure python.

The final answer of a text is what follows its last ``####`` (the GSM8K solution format),
else the content of its last ``\\boxed{...}``, else its last number. The answer field is read
the same way, so it may be a bare ``42`` or a whole GSM8K solution ending in ``#### 42``.
Numbers are compared exactly (as fractions) after the usual conventions: thousands commas
(``1,234``), currency and units around the number (``$12``, ``12 dollars``, ``12%``), a
trailing ``.0`` or ``.``, fractions (``3/4`` and ``\\frac{3}{4}`` equal ``0.75``), negative
numbers. A final answer that is not a number (``\\boxed{B}``) is compared as text, like
``exact_match``.
"""

from __future__ import annotations

import re
from fractions import Fraction

from .exact_match import normalize

NAME = "math_answer"
MARKER = "####"
_BOXES = ("\\boxed", "\\fbox")
# A plain number: thousands groups or digits, optional decimals; or a bare decimal (.5).
_PLAIN = r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
# A sign only where it cannot be a subtraction (3-5 is 3 and 5, not 3 and -5).
_NUMBER = re.compile(rf"(?<![\w.])(?:(?<![\w)])-)?{_PLAIN}(?:\s*/\s*{_PLAIN})?")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LATEX_NOISE = (
    ("{,}", ","), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", " "), ("~", " "),
    ("\\left", ""), ("\\right", ""), ("\\$", ""), ("\\%", ""), ("^\\circ", ""),
    ("^{\\circ}", ""), ("\u2212", "-"), ("\u2013", "-"),
)  # fmt: skip


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces
    balanced (``\\boxed{\\frac{3}{4}}`` -> ``\\frac{3}{4}``); None when there is none or it
    is never closed."""
    start = max(text.rfind(box) for box in _BOXES)
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0:
        return None
    depth = 0
    for index in range(open_at, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : index]
    return None


def final_answer(text: str) -> str | None:
    """The final-answer part of ``text``: after the last ``####``, else the last boxed
    content, else the last number; None when ``text`` has none of them."""
    if MARKER in text:
        return text.rsplit(MARKER, 1)[1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(_clean(text))
    return numbers[-1] if numbers else None


def _clean(text: str) -> str:
    """LaTeX spelling of numbers -> plain (``\\frac{3}{4}`` -> ``3/4``, ``\\$`` dropped)."""
    for old, new in _LATEX_NOISE:
        text = text.replace(old, new)
    text = _TEXT.sub(r" \1 ", text)
    return _FRAC.sub(r"\1/\2", text)


def _fraction(token: str) -> Fraction | None:
    sign = -1 if token.startswith("-") else 1
    parts = token.lstrip("-").replace(",", "").split("/")
    try:
        values = [Fraction(part.strip()) for part in parts]
    except (ValueError, ZeroDivisionError):
        return None
    if len(values) == 2:
        if values[1] == 0:
            return None
        return sign * values[0] / values[1]
    return sign * values[0]


def to_number(answer: str) -> Fraction | None:
    """The first number in a final answer (``"$1,234.50 dollars"`` -> 1234.5, ``"3/4"`` ->
    3/4, ``"-\\frac{1}{2}"`` -> -1/2), exactly; None when it holds no number."""
    found = _NUMBER.search(_clean(answer))
    return None if found is None else _fraction(found.group(0))


def score(response: str, answer: str | None) -> float:
    """1.0 when the final answer of ``response`` equals the final answer of ``answer``
    (numerically, or as normalised text when the answer is not a number), else 0.0."""
    if answer is None:
        return 0.0
    want_text = final_answer(answer)
    if want_text is None:
        want_text = answer.strip()
    got_text = final_answer(response)
    if got_text is None:
        return 0.0
    want = to_number(want_text)
    if want is not None:
        return 1.0 if to_number(got_text) == want else 0.0
    wanted = normalize(want_text)
    return 1.0 if wanted and normalize(got_text) == wanted else 0.0
