"""The Kubernetes quantity grammar: what it accepts, the amount it reads, and its bounds."""

from __future__ import annotations

from decimal import Decimal

import pytest

from rlhfspec_api.quantity import QuantityError, check_positive_quantity, parse_quantity

VALID = [
    ("1", Decimal(1)),
    ("500m", Decimal("0.5")),
    ("1e3", Decimal(1000)),
    ("1E3", Decimal(1000)),
    ("2.5e-3", Decimal("0.0025")),
    ("1e+2", Decimal(100)),
    ("1E", Decimal(10) ** 18),  # E alone is exa, not an exponent
    ("1k", Decimal(1000)),
    ("1M", Decimal(10) ** 6),
    ("1G", Decimal(10) ** 9),
    ("1T", Decimal(10) ** 12),
    ("1P", Decimal(10) ** 15),
    ("100n", Decimal("1E-7")),
    ("3u", Decimal("3E-6")),
    ("1Ki", Decimal(1024)),
    ("1.5Mi", Decimal("1.5") * 1024**2),
    ("8Gi", Decimal(8) * 1024**3),
    ("1Ti", Decimal(1024) ** 4),
    ("1Pi", Decimal(1024) ** 5),
    ("1Ei", Decimal(1024) ** 6),
    ("+2", Decimal(2)),
    ("-2", Decimal(-2)),
    (".5", Decimal("0.5")),
    ("5.", Decimal(5)),
    ("0", Decimal(0)),
]

INVALID = [
    "",
    "Gi",
    "1 Gi",
    " 1",
    "1\n",
    "4gi",
    "1KI",
    "1Kii",
    "1.2.3",
    "1e",
    "1e3.5",
    "1e3Gi",
    "0x10",
    "1_000",
    "--1",
    ".",
    "1m\x00",
    "1" * 65,  # past the length bound before any arithmetic
    "1e101",  # exponent bound
]


@pytest.mark.parametrize(("text", "amount"), VALID)
def test_valid_quantities_read_their_amount(text: str, amount: Decimal) -> None:
    assert parse_quantity(text) == amount


@pytest.mark.parametrize("text", INVALID)
def test_invalid_quantities_are_refused(text: str) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(text)


@pytest.mark.parametrize("text", ["0", "-1", "0m", "-500m", "0Gi"])
def test_positive_bound(text: str) -> None:
    with pytest.raises(QuantityError, match="greater than 0"):
        check_positive_quantity(text)


@pytest.mark.parametrize("text", ["1234567890123456789012345678901234567890", "9Ei", "1e19"])
def test_upper_bound(text: str) -> None:
    with pytest.raises(QuantityError, match="larger than"):
        check_positive_quantity(text)


def test_bounds_admit_the_usual_amounts() -> None:
    assert check_positive_quantity("1m") == Decimal("0.001")
    assert check_positive_quantity("7Ei") == 7 * Decimal(1024) ** 6
    assert check_positive_quantity(str(2**63 - 1)) == 2**63 - 1
