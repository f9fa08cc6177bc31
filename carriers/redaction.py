"""Removes secrets and masks MSISDNs before an exchange is stored or logged."""

from __future__ import annotations

import re
from collections.abc import Iterable

from models.msisdn import looks_like_msisdn, mask_msisdn

# tel:+33612345678, tel%3A%2B33612345678, +33612345678: always a number
_WRITTEN = r"(?:tel:|tel%3A)(?:\+|%2B)?[0-9]{6,15}|(?:\+|%2B)[0-9]{7,15}"
# a bare run of 8-15 digits standing on its own (msisdn=33612345678, "447700900123",
# <msisdn>...</msisdn>) is only a candidate: not inside a word or a hyphenated identifier
# (sub-123456789-c1-a0, fr-azur-00000012), nor a decimal (1234567890.50); phonenumbers decides
_BARE = r"(?<![\w.\-])[0-9]{8,15}(?![\w\-]|\.[0-9])"
_MSISDN = re.compile(rf"(?P<written>{_WRITTEN})|(?P<bare>{_BARE})", re.IGNORECASE)

# the label a bare run is the value of (id:..., submit date:..., "msgid"="...", <doneDate>):
# dates, times and message ids are never a subscriber's number
_LABEL = re.compile(r"(?:([A-Za-z_]+)[\"']?\s*[:=]\s*[\"']?"
                    r"|<(?:[\w-]+:)?([A-Za-z_]+)[^<>]*>)$")
_LABEL_LOOKBACK = 40
_NOT_NUMBER_LABELS = frozenset({"id", "msgid", "message_id", "messageid", "receipted_message_id"})
_NOT_NUMBER_SUFFIXES = ("date", "time", "timestamp")


def _labelled_otherwise(text: str, start: int) -> bool:
    found = _LABEL.search(text, max(0, start - _LABEL_LOOKBACK), start)
    if found is None:
        return False
    label = (found.group(1) or found.group(2) or "").lower()
    return label in _NOT_NUMBER_LABELS or label.endswith(_NOT_NUMBER_SUFFIXES)


def _mask(match: re.Match[str]) -> str:
    text = match.group(0)
    if match.group("bare") is not None:
        if _labelled_otherwise(match.string, match.start()) or not looks_like_msisdn(text):
            return text
        return mask_msisdn(text).lstrip("+")
    digits = re.sub(r"^(?:tel:|tel%3A)?(?:\+|%2B)?", "", text, flags=re.IGNORECASE)
    prefix = text[: len(text) - len(digits)]
    return prefix + mask_msisdn(digits).lstrip("+")


# credentials derived from a secret inside SOAP headers (WS-Security, vendor headers)
_XML_CREDENTIALS = re.compile(
    r"(<(?:[\w-]+:)?(?:Password|spPassword|Nonce)\b[^>]*>)[^<]*(</)")


# bearer credentials handed to a carrier inside a body (CAMARA sinkCredential: derived per
# operation, so not among the configured secrets)
_JSON_CREDENTIALS = re.compile(r'("(?:accessToken|refreshToken|password)"\s*:\s*")[^"]*(")')


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _XML_CREDENTIALS.sub(r"\1***\2", text)
    text = _JSON_CREDENTIALS.sub(r"\1***\2", text)
    return _MSISDN.sub(_mask, text)
