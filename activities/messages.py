"""Inputs and outputs of the activities: one dataclass each, so fields can be added safely."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass
class ChargeInput:
    subscription_id: int
    subscriber_id: int
    carrier_id: str
    cycle: int
    attempt_slot: int
    # derived from (subscription, cycle, attempt slot), never from the activity attempt
    idempotency_key: str
    amount_minor: int
    currency: str
    due_at: datetime
    description: str


@dataclass
class ChargeOutput:
    outcome: str
    carrier_reference: str | None = None
    carrier_code: str | None = None
    message: str = ""


@dataclass
class StatusInput:
    subscription_id: int
    status: str
    at: datetime


@dataclass
class RefundInput:
    subscription_id: int
    cycle: int
    reason: str


@dataclass
class RefundOutput:
    outcome: str
    amount_minor: int
    currency: str
    carrier_reference: str | None = None
    carrier_code: str | None = None
    message: str = ""


def charge_key(subscription_id: int, cycle: int, attempt_slot: int) -> str:
    return f"sub-{subscription_id}-c{cycle}-a{attempt_slot}"


def refund_key(subscription_id: int, cycle: int) -> str:
    return f"refund-sub-{subscription_id}-c{cycle}"
