"""MSISDN parsing into E.164, and masking for anything that is stored or logged."""

from __future__ import annotations

import phonenumbers


class MsisdnError(ValueError):
    pass


def normalize_msisdn(raw: str) -> str:
    """E.164 form of an international number ("+33612345678"); refuses anything not dialable."""
    if not raw.startswith("+"):
        raise MsisdnError(f"MSISDN must be in international form starting with '+': {raw!r}")
    try:
        number = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException as exc:
        raise MsisdnError(f"malformed MSISDN {raw!r}: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise MsisdnError(f"MSISDN {raw!r} is not a valid number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def country_of(msisdn: str) -> str | None:
    return phonenumbers.region_code_for_number(phonenumbers.parse(msisdn, None))


def mask_msisdn(msisdn: str) -> str:
    """Keeps the country prefix and the last two digits: +3361234567 -> +33*******67."""
    digits = msisdn.removeprefix("tel:").lstrip("+")
    if len(digits) <= 5:
        return "*" * len(digits)
    return "+" + digits[:2] + "*" * (len(digits) - 4) + digits[-2:]
