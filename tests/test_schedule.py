from datetime import UTC, datetime, timedelta

import pytest

from workflows.schedule import add_months, due_at

JAN_31 = datetime(2027, 1, 31, 9, 30, tzinfo=UTC)


def test_monthly_cycles_clamp_to_the_month_and_do_not_drift() -> None:
    dues = [due_at(JAN_31, "monthly", cycle) for cycle in range(1, 14)]
    assert [(d.month, d.day) for d in dues] == [
        (1, 31), (2, 28), (3, 31), (4, 30), (5, 31), (6, 30), (7, 31), (8, 31), (9, 30),
        (10, 31), (11, 30), (12, 31), (1, 31)]
    assert dues[-1].year == 2028


def test_leap_february() -> None:
    assert add_months(datetime(2028, 1, 31, tzinfo=UTC), 1).day == 29
    assert add_months(datetime(2028, 2, 29, tzinfo=UTC), 12) == datetime(2029, 2, 28, tzinfo=UTC)


@pytest.mark.parametrize(("period", "cycle", "expected"), [
    ("daily", 3, timedelta(days=2)),
    ("weekly", 2, timedelta(weeks=1)),
    ("interval", 4, timedelta(seconds=30)),
    ("one_off", 1, timedelta(0)),
])
def test_fixed_periods(period: str, cycle: int, expected: timedelta) -> None:
    assert due_at(JAN_31, period, cycle, interval_seconds=10) - JAN_31 == expected


@pytest.mark.parametrize(("period", "cycle"), [("one_off", 2), ("monthly", 0), ("hourly", 1),
                                               ("interval", 2)])
def test_impossible_cycles_are_refused(period: str, cycle: int) -> None:
    with pytest.raises(ValueError):
        due_at(JAN_31, period, cycle)
