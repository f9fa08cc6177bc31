"""Runtime rule types: plain dataclasses of str/int/bool/list/None (and datetime), so Temporal's
default JSON converter carries them into and out of workflows unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass
class MaintenanceWindow:
    """A weekly carrier maintenance window in the subscriber's local time; weekday 0 = Monday.
    [start_minute, end_minute) in minutes after local midnight; end_minute may be 1440."""

    weekday: int
    start_minute: int
    end_minute: int


@dataclass
class Caps:
    per_transaction_minor: int | None = None
    per_day_minor: int | None = None
    per_week_minor: int | None = None
    per_month_minor: int | None = None
    # applies to subscription charges only, counted per subscription
    subscription_per_month_minor: int | None = None
    max_attempts_per_day: int | None = None


@dataclass
class ChargingRules:
    """Everything the workflow needs for one subscription, resolved once at its start."""

    country_code: str
    regime: str
    currency: str
    timezone: str
    window_start_minute: int
    window_end_minute: int
    preferred_minute: int | None
    maintenance: list[MaintenanceWindow]
    caps: Caps
    # "next_window" is encoded as -1
    retry_delays_seconds: list[int]
    max_retries_per_cycle: int
    max_retries_per_day: int
    after_retries: str
    balance_check: bool
    balance_policy: str
    ladder_minor: list[int]
    remainder: str
    opt_in: str
    pin_digits: int
    opt_in_deadline_seconds: int
    welcome_text: bool
    receipt_after_charge: bool
    renewal_reminder_days_before: int | None
    monthly_reminder: bool
    blocked: str | None = None


@dataclass
class Postponement:
    until: datetime
    reason: str


@dataclass
class Refusal:
    rule: str
    figure: str
    limit_minor: int
    spent_minor: int


@dataclass
class SpendSoFar:
    day_minor: int = 0
    week_minor: int = 0
    month_minor: int = 0
    subscription_month_minor: int = 0
    attempts_today: int = 0


# the retry delay that means "at the next window opening"
NEXT_WINDOW = -1
