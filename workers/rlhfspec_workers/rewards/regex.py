"""Rule ``regex``: a format reward, 1 when the response matches the job's pattern.

Where it sits: ``registry`` compiles ``spec.reward.pattern`` once (the contract already checked
that it compiles) and scores rollouts with :func:`score` for ``{type: rule, rule: regex}``,
typically weighted beside a correctness reward in ``spec.rewards``. Pure python.
"""

from __future__ import annotations

import re

NAME = "regex"
FLAGS = re.DOTALL


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The pattern as :func:`score` searches it (``.`` also matches newlines)."""
    return re.compile(pattern, FLAGS)


def score(response: str, pattern: re.Pattern[str] | str) -> float:
    """1.0 when ``re.search(pattern, response, re.DOTALL)`` finds a match, else 0.0."""
    compiled = pattern if isinstance(pattern, re.Pattern) else compile_pattern(pattern)
    return 1.0 if compiled.search(response) else 0.0
