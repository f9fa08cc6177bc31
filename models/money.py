"""Money as integer minor units with each currency's ISO 4217 exponent."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

# ISO 4217 minor-unit exponents for the currencies the platform bills in.
CURRENCY_EXPONENTS: dict[str, int] = {
    "EUR": 2, "GBP": 2, "USD": 2, "AUD": 2, "CHF": 2, "PLN": 2, "SEK": 2, "NOK": 2, "DKK": 2,
    "ZAR": 2, "NGN": 2, "KES": 2, "EGP": 2, "TRY": 2, "BRL": 2, "MXN": 2, "INR": 2,
    "IDR": 2, "PHP": 2, "THB": 2, "MYR": 2, "AED": 2, "SAR": 2, "QAR": 2,
    "JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "XOF": 0,
    "KWD": 3, "BHD": 3, "OMR": 3, "JOD": 3, "TND": 3,
}


class MoneyError(ValueError):
    pass


def exponent(currency: str) -> int:
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise MoneyError(f"unsupported currency {currency!r}") from None


def to_decimal(amount_minor: int, currency: str) -> Decimal:
    """4.99 EUR for (499, "EUR"); 500 JPY for (500, "JPY")."""
    return Decimal(amount_minor).scaleb(-exponent(currency))


def format_major(amount_minor: int, currency: str) -> str:
    exp = exponent(currency)
    return f"{to_decimal(amount_minor, currency):.{exp}f}"


def from_decimal(amount: str | int | float | Decimal, currency: str) -> int:
    """Minor units of a major-unit amount; refuses fractions finer than the currency allows."""
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        raise MoneyError(f"not an amount: {amount!r}") from None
    scaled = value.scaleb(exponent(currency))
    if scaled != scaled.to_integral_value():
        raise MoneyError(f"{amount} has more decimals than {currency} allows")
    return int(scaled)
