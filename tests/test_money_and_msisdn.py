from decimal import Decimal

import pytest

from carriers.redaction import redact
from models.money import MoneyError, format_major, from_decimal, to_decimal
from models.msisdn import MsisdnError, mask_msisdn, normalize_msisdn


@pytest.mark.parametrize(("minor", "currency", "text"), [
    (499, "EUR", "4.99"), (500, "JPY", "500"), (1500, "KWD", "1.500"), (5, "BHD", "0.005"),
])
def test_minor_units_follow_iso_4217_exponents(minor: int, currency: str, text: str) -> None:
    assert format_major(minor, currency) == text
    assert from_decimal(text, currency) == minor
    assert to_decimal(minor, currency) == Decimal(text)


@pytest.mark.parametrize(("amount", "currency"), [("4.999", "EUR"), ("1.5", "JPY"), ("x", "EUR"),
                                                  ("1", "XXX")])
def test_amounts_the_currency_cannot_hold_are_refused(amount: str, currency: str) -> None:
    with pytest.raises(MoneyError):
        from_decimal(amount, currency)


def test_msisdn_normalisation() -> None:
    assert normalize_msisdn("+33 6 12 34 56 78") == "+33612345678"
    assert normalize_msisdn("+81 90-1234-5678") == "+819012345678"
    for bad in ("0612345678", "+33", "+abc", "+3361234"):
        with pytest.raises(MsisdnError):
            normalize_msisdn(bad)


def test_masking_and_redaction() -> None:
    assert mask_msisdn("+33612345678") == "+33*******78"
    text = ('POST /tel%3A%2B33612345678/transactions {"endUserId": "tel:+33612345678", '
            '"password": "s3cr3t", "serverReferenceCode": "fr-azur-00000012"}')
    clean = redact(text, ["s3cr3t"])
    assert "33612345678" not in clean and "s3cr3t" not in clean
    assert "tel:+33*******78" in clean and "tel%3A%2B33*******78" in clean
    assert "fr-azur-00000012" in clean
