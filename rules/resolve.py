"""Resolves the rules for one subscription (country + carrier + product + price) into one
``ChargingRules`` the workflow carries. Reads the data files once per process."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rules.errors import RulesError
from rules.load import CountryRules, RulesData, load_rules
from rules.money_text import show, to_minor
from rules.types import Caps, ChargingRules, MaintenanceWindow

PERIODS = frozenset({"daily", "weekly", "monthly", "one_off", "interval"})

__all__ = ["load_rules", "resolve_rules", "resolve_with", "shipped_rules"]


@lru_cache(maxsize=1)
def shipped_rules() -> RulesData:
    """The validated rules/data files, loaded on first use, with the best charging hours the
    statistics found (rules/data/best_hours.toml) over the carriers' preferred hours."""
    from statistics_service.best_hours import apply_best_hours

    return apply_best_hours(load_rules())


def resolve_rules(country_code: str, carrier_id: str, product_id: str, full_price_minor: int,
                  period: str, subscriber_timezone: str | None = None) -> ChargingRules:
    return resolve_with(shipped_rules(), country_code, carrier_id, product_id, full_price_minor,
                        period, subscriber_timezone)


def resolve_with(data: RulesData, country_code: str, carrier_id: str, product_id: str,
                 full_price_minor: int, period: str,
                 subscriber_timezone: str | None = None) -> ChargingRules:
    """``resolve_rules`` over given data (tests, tools checking a proposed change)."""
    if full_price_minor <= 0:
        raise ValueError("the full price must be positive")
    if period not in PERIODS:
        raise ValueError(f"unknown period {period!r}")
    country = data.countries.get(country_code)
    if country is None:
        raise RulesError("rules/data/countries.toml", country_code, "no rules for this country")
    registered = data.registry.carrier_country.get(carrier_id)
    if registered != country_code:
        raise RulesError("carriers/registry", carrier_id,
                         f"not a carrier of {country_code} (registry: {registered})")
    carrier = data.carrier(carrier_id)
    zone = subscriber_timezone or country.entry.timezone
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {zone!r}") from None
    entry = country.entry
    recurring = period != "one_off"
    caps = Caps(
        per_transaction_minor=country.caps_minor.get("per_transaction"),
        per_day_minor=country.caps_minor.get("per_day"),
        per_week_minor=country.caps_minor.get("per_week"),
        per_month_minor=country.caps_minor.get("per_month"),
        subscription_per_month_minor=(country.caps_minor.get("subscription_per_month")
                                      if recurring else None),
        max_attempts_per_day=entry.max_attempts_per_day,
    )
    own = carrier.entry
    return ChargingRules(
        country_code=country_code,
        regime=entry.regime,
        currency=entry.currency,
        timezone=zone,
        window_start_minute=country.window_start_minute,
        window_end_minute=country.window_end_minute,
        preferred_minute=carrier.preferred_minute,
        maintenance=[MaintenanceWindow(m.weekday, m.start_minute, m.end_minute)
                     for m in carrier.maintenance],
        caps=caps,
        retry_delays_seconds=list(carrier.retry_delays_seconds or country.retry_delays_seconds),
        max_retries_per_cycle=(own.max_retries_per_cycle if own.max_retries_per_cycle is not None
                               else entry.max_retries_per_cycle),
        max_retries_per_day=(own.max_retries_per_day if own.max_retries_per_day is not None
                             else entry.max_retries_per_day),
        after_retries=own.after_retries or entry.after_retries,
        balance_check=own.balance_check,
        balance_policy=own.balance_policy,
        ladder_minor=_ladder_minor(own.ladder, full_price_minor, entry.currency),
        remainder=own.remainder,
        opt_in=entry.opt_in,
        pin_digits=entry.pin_digits,
        opt_in_deadline_seconds=entry.opt_in_deadline_minutes * 60,
        welcome_text=entry.welcome,
        receipt_after_charge=entry.receipt_after_charge,
        renewal_reminder_days_before=entry.renewal_reminder_days_before if period == "monthly" else None,
        monthly_reminder=entry.monthly_reminder and recurring,
        blocked=_blocked(data, country, product_id, full_price_minor, caps, period),
    )


def _ladder_minor(ladder: list[float | str], full_minor: int, currency: str) -> list[int]:
    """Full price first, then each lower step rounded down to minor units, > 0 and distinct;
    explicit amounts at or above the full price are dropped (the full price is tried anyway)."""
    amounts: set[int] = set()
    for step in ladder[1:]:
        if isinstance(step, str):
            amount = to_minor(Decimal(step), currency)
        else:
            amount = int((Decimal(full_minor) * Decimal(str(step))).to_integral_value(ROUND_FLOOR))
        if 0 < amount < full_minor:
            amounts.add(amount)
    return [full_minor, *sorted(amounts, reverse=True)]


def _blocked(data: RulesData, country: CountryRules, product_id: str, price_minor: int,
             caps: Caps, period: str) -> str | None:
    """Why this product may not be sold here at this price, or None."""
    code, entry = country.code, country.entry
    product = data.products.get(product_id)
    if product is None:
        return f"{code}.products: {product_id!r} has no category or age rating in products.toml"
    if product.category in entry.blocked_categories:
        return (f"{code}.blocked_categories: {product_id} is {product.category!r}, which "
                f"{entry.regime} does not allow to be billed")
    if product.age_rating > entry.minimum_age:
        return (f"{code}.minimum_age: {product_id} is rated {product.age_rating}+ but carrier "
                f"billing in {code} only shows the payer is {entry.minimum_age}+")
    price = show(price_minor, entry.currency)
    limits = [("per_transaction", caps.per_transaction_minor), ("per_day", caps.per_day_minor),
              ("per_week", caps.per_week_minor), ("per_month", caps.per_month_minor)]
    if period == "monthly":
        limits.append(("subscription_per_month", caps.subscription_per_month_minor))
    for name, limit in limits:
        if limit is not None and price_minor > limit:
            return (f"{code}.{name}: the price {price} is over the cap of "
                    f"{show(limit, entry.currency)} {name.replace('_', ' ')}")
    return None
