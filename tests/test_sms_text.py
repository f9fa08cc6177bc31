import pytest

from carriers.sms_text import charge_notice, render, sms_encoding


@pytest.mark.parametrize(("text", "encoding", "units", "segments"), [
    ("Hello", "GSM-7", 5, 1),
    ("a" * 160, "GSM-7", 160, 1),
    ("a" * 161, "GSM-7", 161, 2),
    ("a" * 306, "GSM-7", 306, 2),
    ("a" * 307, "GSM-7", 307, 3),
    ("€" * 80, "GSM-7", 160, 1),  # extension characters take two septets
    ("€" * 81, "GSM-7", 162, 2),
    ("ç", "UCS-2", 1, 1),  # lower-case c-cedilla is not in the default alphabet
    ("é" * 10, "GSM-7", 10, 1),
    ("課金" * 35, "UCS-2", 70, 1),
    ("課金" * 36, "UCS-2", 72, 2),
    ("😀" * 35, "UCS-2", 70, 1),  # surrogate pairs count twice
])
def test_encoding_and_segments(text: str, encoding: str, units: int, segments: int) -> None:
    result = sms_encoding(text)
    assert (result.encoding, result.units, result.segments) == (encoding, units, segments)


def test_templates_follow_the_locale_and_currency() -> None:
    assert charge_notice("fr_FR", "Game Pass", 499, "EUR", "84422").startswith(
        "Game Pass : vous avez été débité de 4.99 EUR.")
    assert "1.500 KWD" in charge_notice("ar_KW", "Game Pass", 1500, "KWD", "1555")
    assert "500 JPY" in charge_notice("ja_JP", "Game Pass", 500, "JPY", "1234")
    assert render("charge_notice", "xx_YY", product="P", price="1 EUR", short_code="1").startswith(
        "P: you have been charged")
    assert sms_encoding(charge_notice("ja_JP", "Game Pass", 500, "JPY", "1234")).encoding == "UCS-2"
    assert sms_encoding(charge_notice("en_GB", "Game Pass", 150, "GBP", "84422")).encoding == "GSM-7"


def test_every_premium_charge_notice_fits_one_segment() -> None:
    """Each segment sent from a premium short code is billed: a charge must be one segment."""
    from carriers.loader import default_registry

    registry = default_registry()
    for carrier in registry.carriers.values():
        if carrier.protocol != "smpp":
            continue
        currency = registry.currency_of(carrier.id)
        for price in carrier.price_points:
            assert price.short_code is not None
            text = charge_notice(carrier.locale, "gem-pack cycle 9999",
                                 registry.amount_minor(carrier.id, price), currency,
                                 price.short_code)
            assert sms_encoding(text).segments == 1, (carrier.id, text)
