"""Retry schedules (bounded per cycle and per day, inside the window) and balance ladders."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from rules.ladder import proportion, steps
from rules.resolve import resolve_rules
from rules.retry import next_retry
from rules.windows import next_allowed


@pytest.fixture(autouse=True)
def callback_receiver() -> None:
    """These tests are pure: they need no Temporal server, simulator or callback receiver."""


def utc(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# GB: delays 1h, 4h, next_window; 3 per cycle, 2 per day; window 08-21, preferred 09:00
GB = resolve_rules("GB", "gb-thames", "game-pass", 399, "monthly")


def test_gb_schedule_uses_the_delays_in_order_then_stops() -> None:
    failed = utc(2026, 5, 12, 9, 0)  # 10:00 BST
    first = next_retry(failed, 0, 0, GB)
    assert first == utc(2026, 5, 12, 10, 0)
    second = next_retry(first, 1, 1, GB)
    assert second == utc(2026, 5, 12, 14, 0)
    # next_window: the next day's preferred 09:00 BST
    assert next_retry(second, 2, 2, GB) == utc(2026, 5, 13, 8, 0)
    assert next_retry(second, 3, 0, GB) is None


def test_the_day_budget_pushes_to_the_next_days_opening() -> None:
    failed = utc(2026, 5, 12, 9, 0)
    assert next_retry(failed, 0, 2, GB) == utc(2026, 5, 13, 8, 0)
    # a retry that lands on the next day anyway is not pushed further
    late = utc(2026, 5, 12, 19, 30)  # 20:30 BST + 1h = quiet hours -> tomorrow 09:00
    assert next_retry(late, 0, 2, GB) == utc(2026, 5, 13, 8, 0)


def test_retries_always_land_inside_the_window() -> None:
    start = utc(2026, 3, 27, 0, 0)
    for rules in (GB, resolve_rules("PL", "pl-wisla", "game-pass", 615, "weekly"),
                  resolve_rules("FR", "fr-lumiere", "game-pass", 499, "monthly")):
        for hour in range(0, 24 * 5, 1):
            at = start + timedelta(hours=hour, minutes=17)
            for done in range(rules.max_retries_per_cycle):
                moment = next_retry(at, done, 0, rules)
                assert moment is not None and moment > at
                assert next_allowed(moment, rules) is None, (rules.country_code, at, done)


def test_the_last_delay_repeats_when_the_cycle_allows_more_retries() -> None:
    za = resolve_rules("ZA", "za-springbok", "game-pass", 4900, "monthly")
    assert za.retry_delays_seconds == [14400, -1] and za.max_retries_per_cycle == 4
    failed = utc(2026, 5, 12, 7, 0)  # 09:00 SAST
    assert next_retry(failed, 0, 0, za) == utc(2026, 5, 12, 11, 0)
    assert next_retry(failed, 2, 0, za) == utc(2026, 5, 13, 7, 0)  # preferred 09:00
    assert next_retry(failed, 3, 0, za) == utc(2026, 5, 13, 7, 0)
    assert next_retry(failed, 4, 0, za) is None


def test_no_retries_configured_means_none() -> None:
    assert next_retry(utc(2026, 5, 12, 9, 0), 0, 0, replace(GB, max_retries_per_cycle=0)) is None


def test_ladder_steps_from_fractions_round_down() -> None:
    maya = resolve_rules("MX", "mx-maya", "game-pass", 8900, "monthly")
    assert (maya.balance_check, maya.balance_policy, maya.remainder) == (True, "ladder", "collect_later")
    assert steps(maya) == [8900, 4450, 2225]
    odd = resolve_rules("MX", "mx-maya", "game-pass", 8999, "monthly")
    assert steps(odd) == [8999, 4499, 2249]
    # tiny prices: steps that round to 0 or repeat are dropped
    assert steps(resolve_rules("MX", "mx-maya", "game-pass", 3, "monthly")) == [3, 1]
    assert steps(resolve_rules("MX", "mx-maya", "game-pass", 1, "monthly")) == [1]


def test_ladder_steps_from_explicit_amounts() -> None:
    assert steps(resolve_rules("ZA", "za-springbok", "game-pass", 4900, "monthly")) == [4900, 2000, 1000]
    # amounts not below the price are not steps
    assert steps(resolve_rules("ZA", "za-springbok", "game-pass", 1500, "monthly")) == [1500, 1000]


def test_other_policies_charge_the_full_price_only() -> None:
    assert steps(GB) == [399]
    kw = resolve_rules("KW", "kw-dasman", "game-pass", 1500, "monthly")
    assert (kw.balance_policy, steps(kw)) == ("postpone", [1500])


def test_proportion_buys_service_rounded_down() -> None:
    month = 30 * 86400
    assert proportion(4450, 8900, month) == month // 2
    assert proportion(8900, 8900, month) == month
    assert proportion(0, 8900, month) == 0
    assert proportion(1, 3, 10) == 3  # 3.33 s rounded down
    assert proportion(2225, 8999, 604800) == 149536  # 149536.6...


def test_proportion_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        proportion(9000, 8900, 100)
    with pytest.raises(ValueError):
        proportion(-1, 8900, 100)
    with pytest.raises(ValueError):
        proportion(1, 0, 100)
