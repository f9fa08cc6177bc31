"""MSISDN parsing into E.164, and masking for anything that is stored or logged."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

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


# Mexican carriers still write mobiles with the "1" dropped from the numbering plan in 2019
_LEGACY_PREFIXES = (("521", "52", 13),)


@lru_cache(maxsize=1024)  # redaction asks on every exchange, mostly about the same few
def looks_like_msisdn(digits: str) -> bool:
    """Whether a bare digit run (no '+') reads as an international number: valid once given a
    '+', or written in a legacy form of a valid one, or (12 digits and up, where a
    reference, amount or date rarely lands on a possible length) possible though outside any
    range the metadata knows as assigned, e.g. the UK's reserved +44 7700 900xxx."""
    if not 8 <= len(digits) <= 15 or not digits.isascii() or not digits.isdigit():
        return False
    try:
        number = phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException:
        return False
    if phonenumbers.is_valid_number(number):
        return True
    for legacy, current, length in _LEGACY_PREFIXES:
        if len(digits) == length and digits.startswith(legacy):
            return looks_like_msisdn(current + digits[len(legacy):])
    return (len(digits) >= 12 and phonenumbers.is_possible_number(number)
            and not _date_shaped(digits))


# compact date-times that land on a possible number's length: YYMMDDhhmmss, YYYYMMDDhhmm[ss]
_COMPACT_DATES = (("%y%m%d%H%M%S", 12), ("%Y%m%d%H%M", 12), ("%Y%m%d%H%M%S", 14))


def _date_shaped(digits: str) -> bool:
    for layout, length in _COMPACT_DATES:
        if len(digits) == length:
            try:
                datetime.strptime(digits, layout)  # noqa: DTZ007 (shape only, no instant)
            except ValueError:
                continue
            return True
    return False
