"""Pydantic models of the TOML files: types and ranges only. Checks across fields and files
(windows, ladders, the registry) live in rules/load.py, which can name the field precisely."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Amount = Decimal | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CountryEntry(_Strict):
    regime: str = Field(min_length=1)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    timezone: str
    window: str
    # caps in major units of ``currency``; absent means no such cap
    per_transaction: Amount = Field(default=None, gt=0)
    per_day: Amount = Field(default=None, gt=0)
    per_week: Amount = Field(default=None, gt=0)
    per_month: Amount = Field(default=None, gt=0)
    subscription_per_month: Amount = Field(default=None, gt=0)
    max_attempts_per_day: int | None = Field(default=None, ge=1)
    opt_in: Literal["none", "sms_pin", "two_step"]
    pin_digits: int = Field(default=0, ge=0, le=10)
    opt_in_deadline_minutes: int = Field(default=0, ge=0)
    welcome: bool
    receipt_after_charge: bool
    renewal_reminder_days_before: int | None = Field(default=None, ge=1, le=28)
    monthly_reminder: bool
    stop_keyword_required: bool
    blocked_categories: list[str] = Field(default_factory=list)
    minimum_age: int = Field(ge=0, le=21)
    refund_obligation: str = Field(min_length=1)
    retry_delays: list[str] = Field(min_length=1)
    max_retries_per_cycle: int = Field(ge=0)
    max_retries_per_day: int = Field(ge=0)
    after_retries: Literal["skip", "suspend", "cancel"]
    sources: str = Field(min_length=1)


def _full_price_only() -> list[float | str]:
    return [1.0]


class MaintenanceEntry(_Strict):
    day: str
    start: str
    end: str


class CarrierEntry(_Strict):
    preferred_hour: str | None = None
    maintenance: list[MaintenanceEntry] = Field(default_factory=list)
    balance_check: bool = False
    balance_policy: Literal["charge_full", "ladder", "postpone"] = "charge_full"
    # fractions of the full price (numbers) or explicit major amounts (strings), full first
    ladder: list[float | str] = Field(default_factory=_full_price_only)
    remainder: Literal["collect_later", "write_off"] = "write_off"
    retry_delays: list[str] | None = Field(default=None, min_length=1)
    max_retries_per_cycle: int | None = Field(default=None, ge=0)
    max_retries_per_day: int | None = Field(default=None, ge=0)
    after_retries: Literal["skip", "suspend", "cancel"] | None = None
    revenue_share: float = Field(ge=0.3, le=0.6)


class ProductEntry(_Strict):
    category: str = Field(min_length=1)
    age_rating: int = Field(ge=0, le=21)
