"""Kubernetes resource quantities: the grammar, parsed to an exact decimal.

Where it sits: ``base.Quantity`` (every cpu, memory and storage size of the spec) calls
:func:`parse_quantity`; pure, no pydantic, so the grammar is tested on its own. A regular
expression alone accepted too little (``1e3``) and bounded nothing (a 40-digit memory, cpu
``0``); the value computed here lets the caller put bounds on the amount itself.

The grammar Kubernetes accepts::

    quantity        ::= signedNumber suffix
    signedNumber    ::= number | "+" number | "-" number
    number          ::= digits | digits "." digits | digits "." | "." digits
    suffix          ::= binarySI | decimalExponent | decimalSI
    binarySI        ::= Ki | Mi | Gi | Ti | Pi | Ei          (powers of 1024)
    decimalSI       ::= n | u | m | "" | k | M | G | T | P | E  (powers of 1000)
    decimalExponent ::= "e" signedInteger | "E" signedInteger

``E`` alone is exa (10^18); ``E`` followed by an integer is an exponent (``1E3`` = 1000).
"""

from __future__ import annotations

import re
from decimal import Decimal

# Longer text is refused before any arithmetic: no real quantity needs more, and it bounds
# the work a hostile value can cause.
MAX_QUANTITY_LENGTH = 64
# Kubernetes keeps a quantity's value in a signed 64-bit integer; larger amounts overflow.
MAX_QUANTITY_VALUE = Decimal(2**63 - 1)
# 10^100 is far past any bound; a larger exponent would only overflow the decimal context.
MAX_EXPONENT = 100

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_GRAMMAR = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<binary>Ki|Mi|Gi|Ti|Pi|Ei)"
    r"|[eE](?P<exponent>[+-]?[0-9]+)"
    r"|(?P<decimal>[numkMGTPE]?))"
)


POSITIVE_QUANTITY_PATTERN = (
    r"^\+?([0-9]*[1-9][0-9]*(\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)"
    r"(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
"""The grammar above restricted to amounts above 0 (a non-zero digit, no minus sign), as an
RE2 pattern the CRD carries. It cannot bound the amount (2^63-1, exponents): the parser
does that, so the API server may accept a quantity the operator later refuses, never the
reverse."""


class QuantityError(ValueError):
    """Text that is not a quantity; the message says why."""


def parse_quantity(text: str) -> Decimal:
    """The exact amount ``text`` denotes (``"500m"`` -> 0.5, ``"1Ki"`` -> 1024, ``"1e3"``)."""
    if len(text) > MAX_QUANTITY_LENGTH:
        raise QuantityError(f"longer than {MAX_QUANTITY_LENGTH} characters")
    # fullmatch: a trailing newline or space is part of the text, not something to ignore.
    match = _GRAMMAR.fullmatch(text)
    if match is None:
        raise QuantityError("not a quantity")
    number = Decimal(match["number"])
    binary: str | None = match["binary"]
    if binary is not None:
        product: Decimal = number * (1024 ** _BINARY[binary])
        return product
    written: str | None = match["exponent"]
    if written is not None:
        exponent = int(written)
        if abs(exponent) > MAX_EXPONENT:
            raise QuantityError(f"exponent beyond +-{MAX_EXPONENT}")
    else:
        suffix: str = match["decimal"]
        exponent = _DECIMAL[suffix]
    scaled: Decimal = number.scaleb(exponent)
    return scaled


def check_positive_quantity(text: str) -> Decimal:
    """The amount of ``text``; QuantityError unless 0 < amount <= 2^63-1."""
    value = parse_quantity(text)
    if value <= 0:
        raise QuantityError("must be greater than 0")
    if value > MAX_QUANTITY_VALUE:
        raise QuantityError("is larger than 2^63-1")
    return value
