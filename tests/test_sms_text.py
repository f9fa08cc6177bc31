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


def _longest_values() -> list[dict[str, str]]:
    """Per short code of ours, the values its notices are filled with, at their longest."""
    from carriers.loader import default_registry
    from keywords.routes import load_routes
    from models.money import format_major

    registry = default_registry()
    routes = load_routes()
    values = []
    for carrier in registry.carriers.values():
        currency = registry.currency_of(carrier.id)
        for price in carrier.price_points:
            route = routes.for_price_point(price.id)
            amount = format_major(registry.amount_minor(carrier.id, price), currency)
            values.append({"product": route.service if route else "Game Pass",
                           "price": f"{amount} {currency}",
                           "short_code": price.short_code or "84422",
                           "support": route.support if route else routes.default_support,
                           "pin": "12345678", "date": "2026-12-31"})
    return values


def test_every_notice_fits_one_segment_in_every_language() -> None:
    """Notices are free but must arrive whole: one segment, whatever the language and price."""
    from carriers.sms_text import NOTICE_KINDS, _templates, notice_text

    languages = set(_templates()["charge_notice"])
    for kind in NOTICE_KINDS:
        assert set(_templates()[kind]) == languages, kind
        for language in languages:
            for values in _longest_values():
                text = notice_text(kind, f"{language}_XX", **values)
                assert "{" not in text
                assert sms_encoding(text).segments == 1, (kind, language, text)


def test_notices_follow_the_locale_and_name_every_value() -> None:
    from carriers.sms_text import UnknownNotice, notice_text

    values = {"product": "Game Pass", "price": "3.00 GBP", "short_code": "84422",
              "support": "0800 555 0100", "pin": "4821", "date": "2026-01-31"}
    assert notice_text("opt_in_pin", "en_GB", **values).startswith("Your Game Pass PIN is 4821.")
    assert notice_text("stop_confirmation", "fr_FR", **values).startswith(
        "Vous etes desabonne de Game Pass")
    assert notice_text("help", "xx_YY", **values).startswith("Game Pass: 3.00 GBP. To stop")
    assert sms_encoding(notice_text("welcome", "ja_JP", **values)).encoding == "UCS-2"
    # Latin-script languages stay in GSM-7 (160 characters, not 70)
    for locale in ("en_GB", "fr_FR", "de_DE", "es_ES", "it_IT", "pt_BR", "pl_PL"):
        assert sms_encoding(notice_text("welcome", locale, **values)).encoding == "GSM-7", locale
    with pytest.raises(UnknownNotice):
        notice_text("opt_in_pin", "en_GB", product="Game Pass")  # no PIN: never sent half-made
    with pytest.raises(UnknownNotice):
        notice_text("birthday", "en_GB", **values)
