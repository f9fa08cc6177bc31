"""Workflow inputs, carried state and query views (dataclasses, so fields can be added)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from rules.types import ChargingRules


@dataclass
class Plan:
    period: str  # daily | weekly | monthly | one_off | interval
    amount_minor: int
    currency: str
    # delays, in seconds after the previous failed attempt, of retries after insufficient funds
    retry_delays_seconds: list[int]
    interval_seconds: int | None = None
    # waits between settling attempts after a pending answer (the last one repeats)
    settle_delays_seconds: list[float] = field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0])
    # how long a pending charge is settled before it is left unsettled (carrier data)
    settle_deadline_seconds: float = 2 * 86400.0
    # a free trial: the first charge falls this many days after the start
    trial_days: int = 0
    price_point_id: str = ""


@dataclass
class RuleDecision:
    """A rule that stopped or moved a charge, with its name and the figure that decided."""

    at: datetime
    kind: str  # postponed | refused
    rule: str
    detail: str
    cycle: int = 0


@dataclass
class RefundRecord:
    request_id: str
    cycle: int
    amount_minor: int
    # requested | succeeded | unsettled | failed
    outcome: str = "requested"
    reason: str = ""


@dataclass
class CycleResult:
    cycle: int
    due_at: datetime
    # succeeded | failed | cancelled | not_charged (the carrier kept refusing: nothing moved)
    # | unsettled (may have moved money: a late result or reconciliation settles it)
    # | error (ours, e.g. configuration: listed, never retried blindly)
    outcome: str
    attempts: int
    carrier_reference: str | None = None
    carrier_code: str | None = None
    # what was charged (less than the price: a partial payment) and refunded of it
    amount_minor: int = 0
    refunded_minor: int = 0
    partial: bool = False
    # delivered | refunded (delivery failed, money returned) | None: not delivered (yet)
    delivery: str | None = None
    # the charge's key, and a remainder collected later in the cycle (its own charge)
    charge_key: str | None = None
    remainder_minor: int = 0
    remainder_key: str | None = None

    @property
    def paid_minor(self) -> int:
        return self.amount_minor + self.remainder_minor


@dataclass
class BillingState:
    anchor: datetime
    next_cycle: int
    next_charge_at: datetime
    status: str
    charges_succeeded: int = 0
    cycles_failed: int = 0
    insufficient_funds_retries: int = 0
    amount_charged_minor: int = 0
    cancel_requested: bool = False
    runs: int = 1
    # the latest cycles only, so the state carried across continue-as-new stays small
    recent_cycles: list[CycleResult] = field(default_factory=list)
    # keys of the latest charges left unsettled and not yet settled late (bounded), and how
    # many are unsettled in all (the database's count, refreshed when one is settled late)
    unsettled_keys: list[str] = field(default_factory=list)
    unsettled_count: int = 0
    cycles_not_charged: int = 0
    # what an operator must look at, if anything (the BillingIssue search attribute)
    billing_issue: str | None = None
    # the latest error of ours (configuration) that stopped a charge, until an operator acts
    configuration_error: str | None = None
    # -- flows run by rules (subscriptions started with ChargingRules) ----------------------
    # due times count from (anchor, anchor_cycle): a resume or a plan change moves the anchor
    anchor_cycle: int = 1
    # charges moved to a later moment (window, maintenance, balance, a cap's roll-over)
    postponements: int = 0
    # charges a rule refused (a cap, a barred product, retries spent, no opt-in)
    refusals: int = 0
    partial_payments: int = 0
    # remainders of partial payments collected later in their cycle
    remainders_collected: int = 0
    deliveries: int = 0
    delivery_failures: int = 0
    refunds: int = 0
    refunded_minor: int = 0
    retries_day: str = ""
    retries_on_day: int = 0
    decisions: list[RuleDecision] = field(default_factory=list)
    paused: bool = False
    suspended: bool = False
    cancel_at_period_end: bool = False
    pending_plan: Plan | None = None
    pending_rules: ChargingRules | None = None
    opted_in: bool = False
    opt_in_deadline: datetime | None = None
    opt_in_failures: int = 0
    refund_requests: list[RefundRecord] = field(default_factory=list)
    # cycles charged but not delivered whose refund the carrier did not take (it offers none,
    # or refused it): owed to the subscriber, shown as BillingIssue "refund_owed"
    refunds_owed: list[int] = field(default_factory=list)
    # grants the game could not take back after their payment was refunded: the subscriber
    # keeps what was refunded (BillingIssue "revoke_owed")
    revokes_owed: list[int] = field(default_factory=list)
    # refunds started per charge key: each refund gets a key of its own, never reused
    refund_ordinals: dict[str, int] = field(default_factory=dict)


@dataclass
class SubscriptionInput:
    subscription_id: int
    subscriber_id: int
    carrier_id: str
    country_code: str
    product_id: str
    price_point_id: str
    plan: Plan
    first_charge_at: datetime | None = None
    # continue-as-new after this many cycles (or sooner if the server suggests it)
    cycles_per_run: int = 24
    # "<deployment>-<subscription token>": the start of every idempotency key it sends
    key_prefix: str | None = None
    # the carrier's own task queue for its calls (None: the workflow's queue)
    carrier_task_queue: str | None = None
    # set only when continuing as new
    state: BillingState | None = None
    # country, carrier and product rules (None: a plain timer, as before rules existed)
    rules: ChargingRules | None = None
    locale: str = "en"
    # charges start as local activities in the workflow's worker (carriers/gate.py); fixed
    # at the start, so a history always replays the path it took
    local_charges: bool = False


@dataclass
class ChangePlanRequest:
    price_point_id: str
    plan: Plan
    rules: ChargingRules | None = None


@dataclass
class RefundCycleRequest:
    request_id: str
    cycle: int
    # None: everything charged for the cycle that is not yet refunded
    amount_minor: int | None = None
    reason: str = "customer refund"


@dataclass
class RefundRequestInput:
    subscription_id: int
    cycle: int
    reason: str = "customer refund"
    settle_delays_seconds: list[float] = field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0])
    carrier_id: str = ""
    idempotency_key: str | None = None
    settle_deadline_seconds: float = 2 * 86400.0
    carrier_task_queue: str | None = None
    # a partial refund (None: the whole charge)
    amount_minor: int | None = None
    # amount_minor is a ceiling: refund what is left of the charge, up to it
    at_most: bool = False
