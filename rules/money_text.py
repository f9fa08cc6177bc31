"""Amounts as people read them in a cap's figure: "£240.00", "€12.00", "A$20.00", "60.00 zł"."""

from __future__ import annotations

from decimal import Decimal

from models.money import MoneyError, exponent

# currencies the rules name that models/money.py does not list yet (no AU carrier so far)
_EXTRA_EXPONENTS: dict[str, int] = {"AUD": 2}

# (prefix, suffix) per currency; anything else is "12.00 XYZ"
_SYMBOLS: dict[str, tuple[str, str]] = {
    "GBP": ("£", ""), "EUR": ("€", ""), "AUD": ("A$", ""), "USD": ("$", ""),
    "MXN": ("MX$", ""), "BRL": ("R$", ""), "JPY": ("¥", ""), "ZAR": ("R", ""),
    "NGN": ("₦", ""), "KES": ("KSh ", ""), "PLN": ("", " zł"),
}


def exponent_of(currency: str) -> int:
    try:
        return exponent(currency)
    except MoneyError:
        if currency in _EXTRA_EXPONENTS:
            return _EXTRA_EXPONENTS[currency]
        raise


def to_minor(amount: Decimal, currency: str) -> int:
    """Exact minor units of a major amount; refuses finer fractions than the currency has."""
    scaled = amount.scaleb(exponent_of(currency))
    if scaled != scaled.to_integral_value():
        raise MoneyError(f"{amount} has more decimals than {currency} allows")
    return int(scaled)


def show(amount_minor: int, currency: str) -> str:
    digits = exponent_of(currency)
    number = f"{Decimal(amount_minor).scaleb(-digits):.{digits}f}"
    prefix, suffix = _SYMBOLS.get(currency, ("", f" {currency}"))
    return f"{prefix}{number}{suffix}"
