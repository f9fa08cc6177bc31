"""Partial charges when the balance is short: the amounts to try, and what a part buys."""

from __future__ import annotations

from rules.types import ChargingRules


def steps(rules: ChargingRules) -> list[int]:
    """The amounts to try, full price first: the ladder under balance_policy 'ladder', else
    the full price alone (charge_full charges it; postpone waits until the balance covers it)."""
    if rules.balance_policy == "ladder":
        return list(rules.ladder_minor)
    return rules.ladder_minor[:1]


def proportion(paid_minor: int, full_minor: int, period_seconds: int) -> int:
    """Seconds of service ``paid_minor`` of ``full_minor`` buys out of ``period_seconds``,
    rounded down so a part payment never buys more than it paid for."""
    if full_minor <= 0 or period_seconds < 0:
        raise ValueError("the full price must be positive and the period not negative")
    if not 0 <= paid_minor <= full_minor:
        raise ValueError(f"paid {paid_minor} is outside 0..{full_minor}")
    return paid_minor * period_seconds // full_minor
