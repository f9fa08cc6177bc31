"""Workflow inputs, carried state and query views (dataclasses, so fields can be added)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


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
