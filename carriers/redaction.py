"""Removes secrets and masks MSISDNs before an exchange is stored or logged."""

from __future__ import annotations

import re
from collections.abc import Iterable

from models.msisdn import mask_msisdn

# tel:+33612345678, tel%3A%2B33612345678, +33612345678 (a bare digit run is left alone:
# it is more often a reference code than a phone number)
_MSISDN = re.compile(r"(?:tel:|tel%3A)(?:\+|%2B)?\d{6,15}|(?:\+|%2B)\d{7,15}", re.IGNORECASE)


def _mask(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = re.sub(r"^(?:tel:|tel%3A)?(?:\+|%2B)?", "", text, flags=re.IGNORECASE)
    prefix = text[: len(text) - len(digits)]
    return prefix + mask_msisdn(digits).lstrip("+")


# credentials derived from a secret inside SOAP headers (WS-Security, vendor headers)
_XML_CREDENTIALS = re.compile(
    r"(<(?:[\w-]+:)?(?:Password|spPassword|Nonce)\b[^>]*>)[^<]*(</)")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _XML_CREDENTIALS.sub(r"\1***\2", text)
    return _MSISDN.sub(_mask, text)
