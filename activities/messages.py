"""Inputs and outputs of the activities: one dataclass each, so fields can be added safely."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from carriers.reports import CarrierReport
from rules.types import ChargingRules, Refusal

# a local charge attempt that found no room in its worker (nothing recorded, nothing sent)
OVERFLOW = "overflow"

__all__ = ["CarrierReport"]


@dataclass
class DecisionNote:
    at: datetime
    kind: str  # postponed | refused
    rule: str
    detail: str


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
    # (kept for histories recorded before the operation record decided this)
    settling: bool = False
    # a result the carrier pushed, relayed by signal (the operation record keeps it too)
    reported: CarrierReport | None = None
    # the subscription's rules: spend caps are checked against the ledger before the first
    # send (None: no caps)
    rules: ChargingRules | None = None
    is_subscription: bool = True
    # the cycle's full price when this charge asks less (a partial payment down the ladder)
    list_price_minor: int | None = None
    # what the rules decided since the last charge (postponements, refusals): recorded for
    # the interaction store with the charge, since a workflow does no I/O of its own
    decisions: list[DecisionNote] = field(default_factory=list)


@dataclass
class ChargeOutput:
    # succeeded | insufficient_funds | rejected: final; transient: nothing happened, may be
    # sent again later; pending | unknown: may have debited, to be settled; overflow: the
    # local attempt found no room in this worker, nothing was recorded or sent
    outcome: str
    carrier_reference: str | None = None
    carrier_code: str | None = None
    message: str = ""
    retry_after_seconds: float | None = None
    # something operators must fix, not the subscriber: "credentials_rejected"
    issue: str | None = None
    # outcome "refused_by_rule": nothing was sent, this rule (with its figure) stopped it
    refusal: Refusal | None = None


@dataclass
class BalanceInput:
    subscription_id: int
    subscriber_id: int
    carrier_id: str
    currency: str


@dataclass
class BalanceOutput:
    # None: the carrier could not say (the charge goes ahead at full price)
    available_minor: int | None
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
    # the refund's idempotency key (from the subscription's key prefix)
    idempotency_key: str | None = None
    # a partial refund (None: the whole charge)
    amount_minor: int | None = None
    # amount_minor is a ceiling: refund what is left of the charge, up to it
    at_most: bool = False


@dataclass
class RefundOutput:
    outcome: str
    amount_minor: int
    currency: str
    carrier_reference: str | None = None
    carrier_code: str | None = None
    message: str = ""
    retry_after_seconds: float | None = None
    issue: str | None = None


@dataclass
class UnsettledInput:
    idempotency_key: str
    reason: str


@dataclass
class LateSettlementInput:
    """Settles an operation its workflow left unsettled, from a late pushed result or a
    look-up; never sends anything."""

    idempotency_key: str
    reported: CarrierReport | None = None


@dataclass
class LateSettlementOutput:
    idempotency_key: str
    state: str
    outcome: str | None = None
    carrier_reference: str | None = None
    message: str = ""
    # the workflow that left it unsettled, told when it is settled
    workflow_id: str | None = None
    # how many operations of that subscription are still unsettled
    still_unsettled: int = 0
    amount_minor: int = 0


@dataclass
class SettledNotice:
    """Tells a subscription that one of its unsettled operations is settled."""

    idempotency_key: str
    still_unsettled: int
    # how it settled: a charge that succeeded after all is delivered (or refunded)
    outcome: str | None = None
    amount_minor: int = 0


def key_prefix(deployment_id: str, key_token: str) -> str:
    """Keys are ``<deployment>-<subscription token>-...``: unique across databases, restores and
    environments that share one merchant account at a carrier."""
    return f"{deployment_id}-{key_token}"


def charge_key(prefix: str, cycle: int, attempt_slot: int) -> str:
    return f"{prefix}-c{cycle}-a{attempt_slot}"


def refund_key(prefix: str, cycle: int) -> str:
    return f"{prefix}-r{cycle}"
