"""SMS texts: per-locale templates, and the GSM-7 or UCS-2 encoding and segment count a text
needs (3GPP TS 23.038), which decide what a message costs to send."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from models.money import format_major

TEMPLATES_FILE = Path(__file__).resolve().parent / "sms_templates.toml"

# GSM 03.38 default alphabet, and the characters reached through the escape (two septets each)
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")

SINGLE_LIMITS = {"GSM-7": 160, "UCS-2": 70}
MULTIPART_LIMITS = {"GSM-7": 153, "UCS-2": 67}


@dataclass(frozen=True)
class SmsEncoding:
    encoding: str  # GSM-7 | UCS-2
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int


def sms_encoding(text: str) -> SmsEncoding:
    if all(c in GSM7_BASIC or c in GSM7_EXTENDED for c in text):
        encoding, units = "GSM-7", sum(2 if c in GSM7_EXTENDED else 1 for c in text)
    else:
        encoding, units = "UCS-2", len(text.encode("utf-16-be")) // 2
    if units <= SINGLE_LIMITS[encoding]:
        return SmsEncoding(encoding, units, 1)
    per_part = MULTIPART_LIMITS[encoding]
    return SmsEncoding(encoding, units, -(-units // per_part))


@lru_cache(maxsize=1)
def _templates() -> dict[str, dict[str, str]]:
    return tomllib.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))


def render(template: str, locale: str, **values: str) -> str:
    """The template in the locale's language, falling back to English."""
    texts = _templates()[template]
    language = locale.replace("-", "_").split("_")[0].lower()
    return texts.get(language, texts["en"]).format(**values)


def charge_notice(locale: str, product: str, amount_minor: int, currency: str,
                  short_code: str) -> str:
    return render("charge_notice", locale, product=product, short_code=short_code,
                  price=f"{format_major(amount_minor, currency)} {currency}")


# the notices and keyword answers, each a table of carriers/sms_templates.toml
NOTICE_KINDS = ("welcome", "receipt", "renewal_reminder", "monthly_reminder", "opt_in_pin",
                "help", "stop_confirmation", "refused", "already_subscribed")


class UnknownNotice(KeyError):
    """A notice kind with no template, or a value its template needs that was not given."""


def notice_text(kind: str, locale: str, **values: str) -> str:
    """A notice in the locale's language (English when it has none); every value it names
    must be given, so a notice never leaves with a hole in it."""
    if kind not in NOTICE_KINDS:
        raise UnknownNotice(f"no notice kind {kind!r}")
    try:
        return render(kind, locale, **values)
    except KeyError as exc:
        raise UnknownNotice(f"notice {kind!r} needs the value {exc}") from None
