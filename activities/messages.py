"""Inputs and outputs of the activities: one dataclass each, so fields can be added safely."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from carriers.reports import CarrierReport

__all__ = ["CarrierReport"]


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
    # set when an earlier answer was pending: settle by report or status look-up, then resend
    # only if the carrier has no record of the key
    settling: bool = False
    reported: CarrierReport | None = None


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
    settling: bool = False
    reported: CarrierReport | None = None


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


def workflow_id_for_key(idempotency_key: str) -> str | None:
    """The workflow waiting on an operation, from the key it sent: how callbacks find it."""
    parts = idempotency_key.split("-")
    if idempotency_key.startswith("sub-") and len(parts) == 4 and parts[1].isdigit():
        return f"subscription-{parts[1]}"
    if idempotency_key.startswith("refund-sub-") and len(parts) == 4 and parts[2].isdigit():
        return f"refund-subscription-{parts[2]}-cycle-{parts[3].removeprefix('c')}"
    return None
