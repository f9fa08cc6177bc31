"""Spending caps per regime, with the exact figures, and when a refused cap rolls over."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from rules.caps import first_refusal, next_cap_reset
from rules.load import RegistryView, load_rules
from rules.resolve import resolve_rules, resolve_with, shipped_rules
from rules.types import ChargingRules, Refusal, SpendSoFar


@pytest.fixture(autouse=True)
def callback_receiver() -> None:
    """These tests are pure: they need no Temporal server, simulator or callback receiver."""


def spent(day: int = 0, week: int = 0, month: int = 0, subscription: int = 0,
          attempts: int = 0) -> SpendSoFar:
    return SpendSoFar(day, week, month, subscription, attempts)


def au_rules() -> ChargingRules:
    data = shipped_rules()
    view = RegistryView({**data.registry.carrier_country, "au-test": "AU"},
                        {**data.registry.carrier_protocol, "au-test": "oneapi"},
                        data.registry.country_currency)
    return resolve_with(load_rules(registry=view), "AU", "au-test", "game-pass", 299, "monthly")


def utc(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# --- GB: UK PSR 2017, £40 per transaction, £240 per month -----------------------------------

GB = resolve_rules("GB", "gb-thames", "game-pass", 399, "monthly")


def test_gb_month_cap() -> None:
    assert first_refusal(399, spent(month=23700), GB, True) == Refusal(
        "GB.per_month", "£240.00 per month (spent £237.00, this charge £3.99)", 24000, 23700)
    # exactly at the cap is allowed
    assert first_refusal(399, spent(month=23601), GB, True) is None
    assert first_refusal(399, spent(month=23602), GB, True) is not None


def test_gb_transaction_cap() -> None:
    assert first_refusal(4001, spent(), GB, False) == Refusal(
        "GB.per_transaction", "£40.00 per transaction (this charge £40.01)", 4000, 0)
    assert first_refusal(4000, spent(), GB, False) is None


def test_gb_attempts_per_day() -> None:
    assert first_refusal(399, spent(attempts=3), GB, True) is None
    assert first_refusal(399, spent(attempts=4), GB, True) == Refusal(
        "GB.max_attempts_per_day", "4 charge attempts per day (made 4)", 4, 4)


def test_caps_are_checked_in_order() -> None:
    # over both the transaction and the month cap: the transaction cap is named
    refusal = first_refusal(4500, spent(month=23000, attempts=9), GB, True)
    assert refusal is not None and refusal.rule == "GB.per_transaction"
    refusal = first_refusal(399, spent(month=23900, attempts=9), GB, True)
    assert refusal is not None and refusal.rule == "GB.per_month"


# --- IT: AGCOM; PSD2 exclusion €50 / €300 ----------------------------------------------------

IT = resolve_rules("IT", "it-tirreno", "game-pass", 499, "monthly")


def test_it_caps() -> None:
    assert first_refusal(5001, spent(), IT, True) == Refusal(
        "IT.per_transaction", "€50.00 per transaction (this charge €50.01)", 5000, 0)
    assert first_refusal(499, spent(month=29600), IT, True) == Refusal(
        "IT.per_month", "€300.00 per month (spent €296.00, this charge €4.99)", 30000, 29600)
    assert first_refusal(499, spent(attempts=3), IT, True) == Refusal(
        "IT.max_attempts_per_day", "3 charge attempts per day (made 3)", 3, 3)
    assert first_refusal(499, spent(month=29501, attempts=2), IT, True) is None


# --- FR: SMS+, subscriptions at most €12 per month -------------------------------------------

FR = resolve_rules("FR", "fr-azur", "game-pass", 499, "monthly")


def test_fr_subscription_month_cap_applies_to_subscriptions_only() -> None:
    assert first_refusal(499, spent(month=800, subscription=800), FR, True) == Refusal(
        "FR.subscription_per_month",
        "€12.00 per month for a subscription (spent €8.00, this charge €4.99)", 1200, 800)
    assert first_refusal(499, spent(month=800, subscription=701), FR, True) is None
    # a one-off purchase is not held to the subscription cap
    assert first_refusal(499, spent(month=800, subscription=800), FR, False) is None


def test_fr_general_caps() -> None:
    assert first_refusal(499, spent(month=29600), FR, True) == Refusal(
        "FR.per_month", "€300.00 per month (spent €296.00, this charge €4.99)", 30000, 29600)
    assert first_refusal(499, spent(attempts=2), FR, True) == Refusal(
        "FR.max_attempts_per_day", "2 charge attempts per day (made 2)", 2, 2)


# --- AU: C637:2019, A$20 per month -----------------------------------------------------------

def test_au_month_cap() -> None:
    au = au_rules()
    assert first_refusal(299, spent(month=1800), au, True) == Refusal(
        "AU.per_month", "A$20.00 per month (spent A$18.00, this charge A$2.99)", 2000, 1800)
    assert first_refusal(299, spent(month=1701), au, True) is None
    # no per-transaction cap here: a single A$19.99 passes on an empty month
    assert first_refusal(1999, spent(), au, False) is None


# --- MX: day, month and transaction caps in pesos --------------------------------------------

MX = resolve_rules("MX", "mx-azteca", "game-pass", 9900, "monthly")


def test_mx_caps() -> None:
    assert first_refusal(50001, spent(), MX, False) == Refusal(
        "MX.per_transaction", "MX$500.00 per transaction (this charge MX$500.01)", 50000, 0)
    assert first_refusal(9900, spent(day=95000, month=95000), MX, True) == Refusal(
        "MX.per_day", "MX$1000.00 per day (spent MX$950.00, this charge MX$99.00)", 100000, 95000)
    assert first_refusal(9900, spent(day=0, month=195000), MX, True) == Refusal(
        "MX.per_month", "MX$2000.00 per month (spent MX$1950.00, this charge MX$99.00)",
        200000, 195000)


def test_pl_figure_puts_the_symbol_after() -> None:
    pl = resolve_rules("PL", "pl-baltyk", "game-pass", 1999, "monthly")
    refusal = first_refusal(1999, spent(month=119000), pl, True)
    assert refusal is not None
    assert refusal.figure == "1200.00 zł per month (spent 1190.00 zł, this charge 19.99 zł)"


def test_kw_uses_three_decimals() -> None:
    kw = resolve_rules("KW", "kw-dasman", "game-pass", 1500, "monthly")
    refusal = first_refusal(1500, spent(month=14000), kw, True)
    assert refusal is not None and refusal.figure == (
        "15.000 KWD per month (spent 14.000 KWD, this charge 1.500 KWD)")


# --- when a cap rolls over -------------------------------------------------------------------

def test_month_cap_resets_at_local_midnight_of_the_first() -> None:
    refusal = Refusal("GB.per_month", "", 24000, 23700)
    # 1 April 00:00 BST is 31 March 23:00 UTC
    assert next_cap_reset(utc(2026, 3, 15, 12, 0), refusal, GB) == utc(2026, 3, 31, 23, 0)
    assert next_cap_reset(utc(2026, 12, 20, 12, 0), refusal, GB) == utc(2027, 1, 1, 0, 0)


def test_week_cap_resets_on_monday_local() -> None:
    pl = resolve_rules("PL", "pl-baltyk", "game-pass", 1999, "monthly")
    refusal = Refusal("PL.per_week", "", 1, 1)
    # Wednesday 14 January -> Monday 19 January 00:00 CET (18 January 23:00 UTC)
    assert next_cap_reset(utc(2026, 1, 14, 12, 0), refusal, pl) == utc(2026, 1, 18, 23, 0)
    # 23:30 UTC on Sunday 18 January is already Monday in Warsaw: the next Monday
    assert next_cap_reset(utc(2026, 1, 18, 23, 30), refusal, pl) == utc(2026, 1, 25, 23, 0)


def test_day_cap_and_attempts_reset_at_local_midnight() -> None:
    # 05:00 UTC on 10 June is 23:00 on 9 June in Mexico City (UTC-6): midnight is 06:00 UTC
    for rule in ("MX.per_day", "MX.max_attempts_per_day"):
        assert next_cap_reset(utc(2026, 6, 10, 5, 0), Refusal(rule, "", 1, 1), MX) == utc(2026, 6, 10, 6, 0)


def test_subscription_month_cap_resets_monthly() -> None:
    refusal = Refusal("FR.subscription_per_month", "", 1200, 800)
    # 1 November 00:00 CET is 31 October 23:00 UTC (after the fall-back on the 25th)
    assert next_cap_reset(utc(2026, 10, 28, 9, 0), refusal, FR) == utc(2026, 10, 31, 23, 0)


def test_a_transaction_cap_never_rolls_over() -> None:
    with pytest.raises(ValueError, match="does not roll over"):
        next_cap_reset(utc(2026, 1, 1, 12, 0), Refusal("GB.per_transaction", "", 4000, 0), GB)


def test_amounts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        first_refusal(0, spent(), GB, True)
