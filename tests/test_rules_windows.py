"""Charging windows, maintenance and preferred hours, across DST transitions."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from rules.localtime import wall_to_utc
from rules.resolve import resolve_rules
from rules.types import Caps, ChargingRules, MaintenanceWindow, Postponement
from rules.windows import local_charge_time, next_allowed


@pytest.fixture(autouse=True)
def callback_receiver() -> None:
    """These tests are pure: they need no Temporal server, simulator or callback receiver."""


def rules_in(zone: str, window: tuple[int, int] = (8 * 60, 21 * 60), preferred: int | None = None,
             maintenance: list[MaintenanceWindow] | None = None) -> ChargingRules:
    return ChargingRules(
        country_code="XX", regime="test", currency="EUR", timezone=zone,
        window_start_minute=window[0], window_end_minute=window[1], preferred_minute=preferred,
        maintenance=maintenance or [], caps=Caps(), retry_delays_seconds=[3600],
        max_retries_per_cycle=3, max_retries_per_day=2, after_retries="skip",
        balance_check=False, balance_policy="charge_full", ladder_minor=[100],
        remainder="write_off", opt_in="none", pin_digits=0, opt_in_deadline_seconds=0,
        welcome_text=False, receipt_after_charge=False, renewal_reminder_days_before=None,
        monthly_reminder=False)


def utc(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


PARIS = "Europe/Paris"


def test_inside_the_window_is_allowed_and_the_bounds_are_half_open() -> None:
    rules = rules_in(PARIS)
    assert next_allowed(utc(2026, 6, 10, 12, 0), rules) is None
    assert next_allowed(utc(2026, 6, 10, 6, 0), rules) is None  # 08:00 CEST: opening
    closing = next_allowed(utc(2026, 6, 10, 19, 0), rules)  # 21:00 CEST: closed
    assert closing == Postponement(utc(2026, 6, 11, 6, 0), "quiet hours until 08:00 Europe/Paris")


def test_paris_spring_forward_next_morning_is_0800_cest() -> None:
    # Saturday 28 March 2026 22:00 CET; clocks go 02:00 -> 03:00 on Sunday 29 March
    answer = next_allowed(utc(2026, 3, 28, 21, 0), rules_in(PARIS))
    assert answer == Postponement(utc(2026, 3, 29, 6, 0), "quiet hours until 08:00 Europe/Paris")


def test_paris_fall_back_next_morning_is_0800_cet() -> None:
    # Saturday 24 October 2026 22:00 CEST; clocks go 03:00 -> 02:00 on Sunday 25 October
    answer = next_allowed(utc(2026, 10, 24, 20, 0), rules_in(PARIS))
    assert answer == Postponement(utc(2026, 10, 25, 7, 0), "quiet hours until 08:00 Europe/Paris")


def test_a_wall_time_in_the_spring_gap_moves_to_the_first_instant_after_it() -> None:
    paris = ZoneInfo(PARIS)
    # 02:30 does not exist on 29 March 2026: the first valid instant is 03:00 CEST (01:00 UTC)
    assert wall_to_utc(date(2026, 3, 29), 150, paris) == utc(2026, 3, 29, 1, 0)
    rules = rules_in(PARIS, window=(150, 21 * 60))
    answer = next_allowed(utc(2026, 3, 29, 0, 15), rules)  # 01:15 CET
    assert answer == Postponement(utc(2026, 3, 29, 1, 0), "quiet hours until 03:00 Europe/Paris")


def test_an_ambiguous_wall_time_takes_its_first_occurrence() -> None:
    paris = ZoneInfo(PARIS)
    # 02:30 happens twice on 25 October 2026: first at 00:30 UTC (CEST), again at 01:30 UTC
    assert wall_to_utc(date(2026, 10, 25), 150, paris) == utc(2026, 10, 25, 0, 30)
    rules = rules_in(PARIS, window=(150, 21 * 60))
    answer = next_allowed(utc(2026, 10, 24, 23, 0), rules)  # 01:00 CEST
    assert answer is not None and answer.until == utc(2026, 10, 25, 0, 30)
    # the second 02:30 (CET) is inside the window too
    assert next_allowed(utc(2026, 10, 25, 1, 30), rules) is None


@pytest.mark.parametrize("day", [date(2023, 4, 3), date(2023, 10, 30), date(2026, 4, 6),
                                 date(2026, 11, 2)])
def test_mexico_city_keeps_utc_minus_6_all_year_since_2023(day: date) -> None:
    rules = rules_in("America/Mexico_City", window=(9 * 60, 21 * 60))
    evening = datetime(day.year, day.month, day.day, 3, 30, tzinfo=UTC)  # 21:30 local, day before
    answer = next_allowed(evening, rules)
    assert answer is not None
    assert answer.until == datetime(day.year, day.month, day.day, 15, 0, tzinfo=UTC)
    assert answer.reason == "quiet hours until 09:00 America/Mexico_City"


def test_mexico_city_still_shifted_in_2022_summer() -> None:
    # before the abolition the zone's summer was UTC-5: 09:00 was 14:00 UTC
    answer = next_allowed(utc(2022, 7, 5, 3, 30), rules_in("America/Mexico_City", (540, 1260)))
    assert answer is not None and answer.until == utc(2022, 7, 5, 14, 0)


def test_warsaw_quiet_hours_go_to_the_carriers_preferred_time() -> None:
    rules = resolve_rules("PL", "pl-wisla", "game-pass", 615, "weekly")
    assert (rules.window_start_minute, rules.window_end_minute, rules.preferred_minute) == (480, 1320, 600)
    # 22:30 CET on Thursday 15 January: next is Friday 10:00 CET, not the 08:00 opening
    winter = next_allowed(utc(2026, 1, 15, 21, 30), rules)
    assert winter == Postponement(utc(2026, 1, 16, 9, 0), "quiet hours until 10:00 Europe/Warsaw")
    # 05:00 CEST on 15 July: the same day's 10:00 CEST
    summer = next_allowed(utc(2026, 7, 15, 3, 0), rules)
    assert summer == Postponement(utc(2026, 7, 15, 8, 0), "quiet hours until 10:00 Europe/Warsaw")
    # spring forward in Warsaw is 29 March 2026 too: 10:00 CEST that day is 08:00 UTC
    spring = next_allowed(utc(2026, 3, 28, 22, 0), rules)
    assert spring is not None and spring.until == utc(2026, 3, 29, 8, 0)


def test_without_a_preferred_time_quiet_hours_end_at_the_opening() -> None:
    gb = resolve_rules("GB", "gb-thames", "game-pass", 399, "monthly")
    assert next_allowed(utc(2026, 5, 12, 2, 0), gb) == Postponement(
        utc(2026, 5, 12, 8, 0), "quiet hours until 09:00 Europe/London")
    plain = replace(gb, preferred_minute=None)
    assert next_allowed(utc(2026, 5, 12, 2, 0), plain) == Postponement(
        utc(2026, 5, 12, 7, 0), "quiet hours until 08:00 Europe/London")


def test_maintenance_inside_the_window_postpones_to_its_end() -> None:
    # fr-lumiere: maintenance Mondays 08:00-09:30 Paris; window 08:00-20:00; preferred 09:00
    rules = resolve_rules("FR", "fr-lumiere", "game-pass", 499, "monthly")
    assert rules.maintenance == [MaintenanceWindow(0, 480, 570)]
    during = next_allowed(utc(2026, 6, 1, 6, 45), rules)  # Monday 08:45 CEST
    assert during == Postponement(utc(2026, 6, 1, 7, 30), "carrier maintenance until 09:30 Europe/Paris")
    assert next_allowed(utc(2026, 6, 1, 7, 30), rules) is None
    # Sunday night: the preferred 09:00 on Monday is in maintenance, so 09:30
    night = next_allowed(utc(2026, 5, 31, 20, 0), rules)
    assert night == Postponement(utc(2026, 6, 1, 7, 30), "quiet hours until 09:30 Europe/Paris")
    # Tuesday has no maintenance
    assert next_allowed(utc(2026, 6, 2, 6, 45), rules) is None


def test_maintenance_running_to_the_windows_end_moves_to_the_next_day() -> None:
    rules = rules_in(PARIS, maintenance=[MaintenanceWindow(2, 20 * 60, 24 * 60)], preferred=600)
    answer = next_allowed(utc(2026, 6, 3, 18, 30), rules)  # Wednesday 20:30 CEST
    assert answer == Postponement(utc(2026, 6, 4, 8, 0), "carrier maintenance until 10:00 Europe/Paris")


def test_local_charge_time_moves_a_due_time_to_the_preferred_hour_of_its_local_day() -> None:
    gb = resolve_rules("GB", "gb-thames", "game-pass", 399, "monthly")
    assert local_charge_time(utc(2026, 5, 10, 15, 42), gb) == utc(2026, 5, 10, 8, 0)  # 09:00 BST
    assert local_charge_time(utc(2026, 1, 10, 15, 42), gb) == utc(2026, 1, 10, 9, 0)  # 09:00 GMT
    pl = resolve_rules("PL", "pl-baltyk", "game-pass", 1999, "monthly")
    # 23:30 UTC on 15 January is 00:30 on the 16th in Warsaw: that day's 09:00
    assert local_charge_time(utc(2026, 1, 15, 23, 30), pl) == utc(2026, 1, 16, 8, 0)
    due = utc(2026, 1, 15, 23, 30)
    assert local_charge_time(due, replace(pl, preferred_minute=None)) is due


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_allowed(datetime(2026, 1, 1, 12, 0), rules_in(PARIS))


def test_every_shipped_carrier_postpones_into_an_allowed_moment() -> None:
    from rules.resolve import shipped_rules

    data = shipped_rules()
    start = utc(2026, 10, 23, 0, 0)  # across the European fall-back weekend
    for carrier_id, code in data.registry.carrier_country.items():
        rules = resolve_rules(code, carrier_id, "game-pass", 100, "monthly")
        for step in range(0, 4 * 24 * 60, 50):
            at = start + timedelta(minutes=step)
            answer = next_allowed(at, rules)
            if answer is not None:
                assert answer.until > at and next_allowed(answer.until, rules) is None, carrier_id
