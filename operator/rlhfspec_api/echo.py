"""Bounded echoes of user input: how an error line quotes the value it refuses.

Where it sits: every message that shows a bad value (``errors``, ``manifest``, the field
validators of the spec) formats it with :func:`echo`. A plain ``repr`` of a 0.7 MB string
copies it into every error line, and of an aliased YAML structure expands the whole alias
graph (billions of elements); ``echo`` looks at no more than a few dozen elements of any
value and never returns more than about 130 characters.
"""

from __future__ import annotations

import reprlib

ECHO_CHARS = 80
"""How much of a value an error line quotes."""

_REPR = reprlib.Repr()
# Few elements per level and few levels: the work is bounded however big or self-sharing
# the value is, and the result is cut to ECHO_CHARS anyway.
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6
_REPR.maxstring = ECHO_CHARS + 2
_REPR.maxother = ECHO_CHARS
_REPR.maxlong = 40
# Integers longer than this are described, not printed: Python refuses to print past 4300
# digits, and no field takes such a number.
_MAX_INT_BITS = 256


def echo(value: object) -> str:
    """``value`` as an error line quotes it: its repr, cut to ECHO_CHARS characters.

    A cut string says how long the original was: ``'aaaa…' (700000 characters)``. Control
    characters are escaped (it is a repr), so the quote never breaks the line.
    """
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]  # as the YAML reads
    if isinstance(value, str):
        if len(value) <= ECHO_CHARS:
            return repr(value)
        head = repr(value[:ECHO_CHARS])
        return f"{head[:-1]}…{head[-1]} ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > _MAX_INT_BITS:
            digits = int(value.bit_length() * 0.30103) + 1
            return f"<an integer of about {digits} digits>"
        return repr(value)
    text = _REPR.repr(value)
    if len(text) <= ECHO_CHARS and "..." not in text:
        return text
    # Cut (by reprlib's "..." or here): say how big the original was.
    text = text[:ECHO_CHARS] + ("…" if len(text) > ECHO_CHARS else "")
    size = _size(value)
    return f"{text} ({size})" if size else text


def _size(value: object) -> str:
    if isinstance(value, list | tuple | dict | set | frozenset):
        return f"{type(value).__name__} of {len(value)} items"
    return ""


MAX_MESSAGE_CHARS = 1024
"""Longest status or event message the operator writes (see :func:`cap`)."""


def cap(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    note = f"… ({len(text) - limit} more characters)"
    return text[: max(0, limit - len(note))] + note


MAX_KEY_CHARS = 40
"""Longest key an error path quotes in full (a key, too, may be megabytes long)."""


def key_text(key: str) -> str:
    """A mapping key as a path shows it: cut to MAX_KEY_CHARS, escaped when not printable."""
    if len(key) > MAX_KEY_CHARS:
        key = key[:MAX_KEY_CHARS] + "…"
    return key if key.isprintable() else repr(key)
