"""The typed client services use to start, describe, cancel and refund subscriptions; and a CLI.

Every request is validated before anything is written: a refused request leaves no row and
starts no workflow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

import codec
from activities.messages import (
    LateSettlementInput,
    LateSettlementOutput,
    RefundOutput,
    key_prefix,
    refund_key,
)
from carriers.base import Capability
from carriers.factory import adapter_class
from carriers.loader import Registry, carrier_task_queue, default_registry
from models import ledger, operations
from models.db import make_engine
from models.money import MoneyError, exponent, from_decimal
from models.msisdn import MsisdnError, normalize_msisdn
from models.tables import (
    Carrier,
    Period,
    PricePoint,
    Product,
    Subscriber,
    Subscription,
    SubscriptionStatus,
)
from reconciliation.report import report_for
from reconciliation.schedule import reconcile_now
from rules.errors import RulesError
from rules.resolve import resolve_rules
from rules.types import ChargingRules
from settings import Settings, get_settings
from traceability.history import payment_story
from traceability.indexer import make_client
from workflows import search_attributes as sa
from workflows.late_settlement import LateSettlementWorkflow, late_settlement_id
from workflows.refund import RefundWorkflow, refund_workflow_id
from workflows.subscription import SubscriptionWorkflow
from workflows.types import (
    BillingState,
    ChangePlanRequest,
    Plan,
    RefundCycleRequest,
    RefundRecord,
    RefundRequestInput,
    SubscriptionInput,
)

_UPDATE_RESULTS: dict[str, type] = {"request_refund": RefundRecord}
# (country, carrier, product, price in minor units, period, subscriber's zone) -> rules
RulesResolver = Callable[[str, str, str, int, str, str | None], ChargingRules]


class SubscriptionRequestError(ValueError):
    """The request was refused; nothing was written."""


class StartSubscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    msisdn: str
    product_id: str = Field(min_length=1)
    # the price the subscriber agreed to, in minor units; must match a registered price point
    amount_minor: int = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    period: Period
    carrier_id: str | None = None
    first_charge_at: datetime | None = None
    cycles_per_run: int = Field(default=24, ge=1, le=500)
    # a free trial: the first charge falls this many days after the start
    trial_days: int = Field(default=0, ge=0, le=366)

    @field_validator("first_charge_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return value
        if value.tzinfo is None:
            raise ValueError("first_charge_at must carry a timezone")
        if value < datetime.now(UTC) - timedelta(minutes=5):
            raise ValueError("first_charge_at is in the past")
        return value


class StartedSubscription(BaseModel):
    subscription_id: int
    workflow_id: str
    carrier_id: str
    price_point_id: str
    # every idempotency key sent for it starts with this: how to find its carrier records
    key_prefix: str


class SubscriptionView(BaseModel):
    subscription_id: int
    workflow_id: str
    status: str
    next_charge_at: datetime | None
    next_cycle: int
    charges_succeeded: int
    cycles_failed: int
    amount_charged_minor: int
    currency: str
    recent_cycles: list[dict[str, Any]]


class SubscriptionClient:
    """``apply_rules``: subscriptions are billed under their country's, carrier's and product's
    rules (windows, caps, opt-in, texts, delivery). Services connect with it on (the
    default); a plain timer without rules is kept for tests of the charge path alone."""

    def __init__(self, client: Client, engine: Engine, registry: Registry, task_queue: str,
                 deployment_id: str = "dev", apply_rules: bool = False,
                 rules_resolver: RulesResolver = resolve_rules,
                 local_charges: bool = False) -> None:
        self.client = client
        self.engine = engine
        self.registry = registry
        self.task_queue = task_queue
        self.deployment_id = deployment_id
        self.apply_rules = apply_rules
        self.rules_resolver = rules_resolver
        # new subscriptions' charges start as local activities (settings.local_charges)
        self.local_charges = local_charges

    @classmethod
    async def connect(cls, settings: Settings | None = None) -> SubscriptionClient:
        settings = settings or get_settings()
        client = await Client.connect(
            settings.temporal_address, namespace=settings.temporal_namespace,
            data_converter=codec.data_converter(settings))
        return cls(client, make_engine(settings.database_url), default_registry(),
                   settings.task_queue, settings.deployment_id, settings.apply_rules,
                   local_charges=settings.local_charges)

    # -- start ----------------------------------------------------------------------------------

    def _validated(self, request: StartSubscriptionRequest) -> tuple[str, Carrier, PricePoint]:
        try:
            msisdn = normalize_msisdn(request.msisdn)
        except MsisdnError as exc:
            raise SubscriptionRequestError(str(exc)) from None
        try:
            exponent(request.currency)
        except MoneyError as exc:
            raise SubscriptionRequestError(str(exc)) from None
        carrier_id = request.carrier_id
        if carrier_id is None:
            routed = self.registry.route(msisdn)
            if routed is None:
                raise SubscriptionRequestError(f"no carrier serves the number range of {msisdn}")
            carrier_id = routed.id
        with Session(self.engine) as session:
            carrier = session.get(Carrier, carrier_id)
            if carrier is None:
                raise SubscriptionRequestError(f"unknown carrier {carrier_id!r}")
            if session.get(Product, request.product_id) is None:
                raise SubscriptionRequestError(f"unknown product {request.product_id!r}")
            if request.currency != carrier.currency:
                raise SubscriptionRequestError(
                    f"currency mismatch: {carrier.id} bills in {carrier.currency}, "
                    f"not {request.currency}"
                )
            price = session.exec(
                select(PricePoint).where(
                    PricePoint.product_id == request.product_id,
                    PricePoint.carrier_id == carrier.id,
                    PricePoint.period == request.period,
                    PricePoint.amount_minor == request.amount_minor,
                    PricePoint.currency == request.currency,
                )
            ).first()
            if price is None:
                raise SubscriptionRequestError(
                    f"no {request.period.value} price point of {request.amount_minor} "
                    f"{request.currency} minor units for {request.product_id} on {carrier.id}"
                )
            return msisdn, carrier, price

    def _insert(self, msisdn: str, carrier: Carrier, price: PricePoint) -> Subscription:
        with Session(self.engine) as session:
            subscriber = session.exec(select(Subscriber).where(Subscriber.msisdn == msisdn)).first()
            if subscriber is None:
                country = self.registry.country_of(carrier.id)
                subscriber = Subscriber(msisdn=msisdn, carrier_id=carrier.id,
                                        timezone=carrier.timezone, locale=country.default_locale)
                session.add(subscriber)
                session.flush()
            assert subscriber.id is not None
            subscription = Subscription(subscriber_id=subscriber.id, product_id=price.product_id,
                                        price_point_id=price.id)
            session.add(subscription)
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                raise SubscriptionRequestError(
                    f"{msisdn} already has a live subscription to {price.product_id}"
                ) from None
            session.refresh(subscription)
            return subscription

    def _plan(self, carrier: Carrier, price: PricePoint, trial_days: int = 0) -> Plan:
        return Plan(
            period=Period(price.period).value,
            amount_minor=price.amount_minor,
            currency=price.currency,
            retry_delays_seconds=price.retry_delays(),
            interval_seconds=price.interval_seconds,
            settle_delays_seconds=self.registry.carriers[carrier.id].settle_delays(),
            settle_deadline_seconds=self.registry.carriers[carrier.id].settle_deadline_seconds,
            trial_days=trial_days,
            price_point_id=price.id,
        )

    def _rules(self, carrier: Carrier, price: PricePoint) -> ChargingRules | None:
        """The rules this subscription is billed under; a product the rules bar here is
        refused before anything is written."""
        if not self.apply_rules:
            return None
        try:
            rules = self.rules_resolver(carrier.country_code, carrier.id, price.product_id,
                                        price.amount_minor, Period(price.period).value,
                                        carrier.timezone)
        except (RulesError, KeyError, ValueError) as exc:
            raise SubscriptionRequestError(f"no rules for {carrier.id}: {exc}") from None
        if rules.blocked:
            raise SubscriptionRequestError(f"refused by rule: {rules.blocked}")
        if price.amount_minor > (rules.caps.per_transaction_minor or price.amount_minor):
            raise SubscriptionRequestError(
                f"refused by rule {carrier.country_code}.per_transaction: the price exceeds "
                f"{rules.caps.per_transaction_minor} minor units per charge")
        return rules

    async def start_subscription(self, request: StartSubscriptionRequest) -> StartedSubscription:
        msisdn, carrier, price = await asyncio.to_thread(self._validated, request)
        rules = self._rules(carrier, price)
        subscription = await asyncio.to_thread(self._insert, msisdn, carrier, price)
        assert subscription.id is not None
        prefix = key_prefix(self.deployment_id, subscription.key_token)
        workflow_input = SubscriptionInput(
            subscription_id=subscription.id,
            subscriber_id=subscription.subscriber_id,
            carrier_id=carrier.id,
            country_code=carrier.country_code,
            product_id=price.product_id,
            price_point_id=price.id,
            plan=self._plan(carrier, price, request.trial_days),
            first_charge_at=request.first_charge_at,
            cycles_per_run=request.cycles_per_run,
            key_prefix=prefix,
            carrier_task_queue=carrier_task_queue(self.task_queue,
                                                  self.registry.carriers[carrier.id]),
            rules=rules,
            locale=self.registry.country_of(carrier.id).default_locale,
            local_charges=self.local_charges,
        )
        try:
            await self.client.start_workflow(
                SubscriptionWorkflow.run,
                workflow_input,
                id=subscription.workflow_id,
                task_queue=self.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=TypedSearchAttributes([
                    SearchAttributePair(sa.CARRIER_ID, carrier.id),
                    SearchAttributePair(sa.COUNTRY_CODE, carrier.country_code),
                    SearchAttributePair(sa.PRODUCT_ID, price.product_id),
                    SearchAttributePair(sa.SUBSCRIPTION_STATUS,
                                        SubscriptionStatus.PENDING_OPT_IN.value
                                        if rules is not None and rules.opt_in != "none"
                                        else SubscriptionStatus.ACTIVE.value),
                ]),
                static_summary=f"{price.product_id} {Period(price.period).value} on {carrier.id}",
            )
        except Exception:
            # Free the subscriber+product slot only when no workflow exists: the start may
            # have reached the server even though its answer did not reach us.
            if not await self._workflow_exists(subscription.workflow_id):
                await asyncio.to_thread(self._abandon, subscription.id)
            raise
        return StartedSubscription(subscription_id=subscription.id,
                                   workflow_id=subscription.workflow_id,
                                   carrier_id=carrier.id, price_point_id=price.id,
                                   key_prefix=prefix)

    async def _workflow_exists(self, workflow_id: str) -> bool:
        try:
            await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError as exc:
            # when it cannot tell, keep the row: it blocks a second subscription, not money
            return exc.status != RPCStatusCode.NOT_FOUND
        return True

    def _abandon(self, subscription_id: int) -> None:
        with Session(self.engine) as session:
            subscription = session.get(Subscription, subscription_id)
            if subscription is not None:
                session.delete(subscription)
                session.commit()

    # -- the rest -------------------------------------------------------------------------------

    def handle(self, subscription_id: int) -> WorkflowHandle[SubscriptionWorkflow, BillingState]:
        return self.client.get_workflow_handle_for(
            SubscriptionWorkflow.run, f"subscription-{subscription_id}"
        )

    async def cancel_subscription(self, subscription_id: int) -> BillingState:
        # mypy 2 cannot match temporalio's update overloads for an async handler
        return await self.handle(subscription_id).execute_update(
            SubscriptionWorkflow.cancel  # type: ignore[arg-type]
        )

    async def _update(self, subscription_id: int, name: str, *args: Any) -> Any:
        """Runs an update; the workflow's validator refusing it is a request error (nothing
        was written to the history)."""
        try:
            return await self.handle(subscription_id).execute_update(
                name, *args, result_type=_UPDATE_RESULTS.get(name, BillingState))
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            raise SubscriptionRequestError(
                str(getattr(cause, "message", None) or cause)) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise SubscriptionRequestError(
                    f"subscription {subscription_id} is not running") from None
            raise

    async def cancel_at_period_end(self, subscription_id: int) -> BillingState:
        result: BillingState = await self._update(subscription_id, "cancel_at_period_end")
        return result

    async def pause(self, subscription_id: int) -> BillingState:
        result: BillingState = await self._update(subscription_id, "pause")
        return result

    async def resume(self, subscription_id: int) -> BillingState:
        result: BillingState = await self._update(subscription_id, "resume")
        return result

    async def confirm_opt_in(self, subscription_id: int, pin: str) -> BillingState:
        result: BillingState = await self._update(subscription_id, "confirm_opt_in", pin)
        return result

    def _price_point(self, subscription_id: int, price_point_id: str
                     ) -> tuple[Carrier, PricePoint]:
        with Session(self.engine) as session:
            subscription = session.get(Subscription, subscription_id)
            if subscription is None:
                raise SubscriptionRequestError(f"unknown subscription {subscription_id}")
            current = session.get(PricePoint, subscription.price_point_id)
            price = session.get(PricePoint, price_point_id)
            if price is None or current is None:
                raise SubscriptionRequestError(f"unknown price point {price_point_id!r}")
            if (price.carrier_id, price.product_id) != (current.carrier_id, current.product_id):
                raise SubscriptionRequestError(
                    f"{price_point_id} is not a price of {current.product_id} on "
                    f"{current.carrier_id}")
            if price.id == current.id:
                raise SubscriptionRequestError(f"the subscription is already on {price.id}")
            carrier = session.get(Carrier, price.carrier_id)
            assert carrier is not None
            return carrier, price

    async def change_plan(self, subscription_id: int, price_point_id: str) -> BillingState:
        """Moves the subscription to another price point of its product and carrier, from
        its next cycle. (The database row follows when that cycle is billed.)"""
        carrier, price = await asyncio.to_thread(self._price_point, subscription_id,
                                                 price_point_id)
        change = ChangePlanRequest(price.id, self._plan(carrier, price),
                                   self._rules(carrier, price))
        result: BillingState = await self._update(subscription_id, "change_plan", change)
        return result

    async def request_refund(self, subscription_id: int, cycle: int,
                             amount_minor: int | None = None, request_id: str | None = None,
                             reason: str = "customer refund") -> RefundRecord:
        """Refunds all or part of a charged cycle through its subscription's workflow, which
        refuses more than was charged; the same request id never refunds twice."""
        if amount_minor is not None and amount_minor <= 0:
            raise SubscriptionRequestError("a refund amount must be positive")
        request = RefundCycleRequest(request_id or f"{subscription_id}-{cycle}", cycle,
                                     amount_minor, reason)
        result: RefundRecord = await self._update(subscription_id, "request_refund", request)
        return result

    async def describe_subscription(self, subscription_id: int) -> SubscriptionView:
        state = await self.handle(subscription_id).query(SubscriptionWorkflow.state)
        with Session(self.engine) as session:
            subscription = session.get(Subscription, subscription_id)
            price = session.get(PricePoint, subscription.price_point_id) if subscription else None
        live = state.status not in ("cancelled", "completed")
        return SubscriptionView(
            subscription_id=subscription_id,
            workflow_id=f"subscription-{subscription_id}",
            status=state.status,
            next_charge_at=state.next_charge_at if live else None,
            next_cycle=state.next_cycle,
            charges_succeeded=state.charges_succeeded,
            cycles_failed=state.cycles_failed,
            amount_charged_minor=state.amount_charged_minor,
            currency=price.currency if price else "",
            recent_cycles=[asdict(c) for c in state.recent_cycles],
        )

    def _check_refundable(self, subscription_id: int, cycle: int) -> tuple[str, str]:
        """The carrier of the charge to refund and the refund's key, once it is known to be
        refundable."""
        with Session(self.engine) as session:
            charge = ledger.charge_for_cycle(session, subscription_id, cycle)
            if charge is None:
                raise SubscriptionRequestError(
                    f"subscription {subscription_id} has no charge for cycle {cycle}"
                )
            if Capability.REFUND not in adapter_class(
                    self.registry.carriers[charge.carrier_id]).capabilities:
                raise SubscriptionRequestError(f"{charge.carrier_id} offers no refunds")
            if ledger.refund_of(session, charge) is not None:
                raise SubscriptionRequestError(
                    f"cycle {cycle} of subscription {subscription_id} is already refunded"
                )
            subscription = session.get(Subscription, subscription_id)
            assert subscription is not None
            return charge.carrier_id, refund_key(
                key_prefix(self.deployment_id, subscription.key_token), cycle)

    async def unsettled(self, carrier_id: str | None = None) -> list[UnsettledOperation]:
        """Charges and refunds that may have moved money and have no final answer: each
        waits for a late result from its carrier, an operator's settle, or reconciliation."""
        return await asyncio.to_thread(_unsettled, self.engine, carrier_id)

    async def settle(self, idempotency_key: str) -> LateSettlementOutput:
        """Asks the carrier again about one unsettled operation (a look-up; never a send)."""
        return await self.client.execute_workflow(
            LateSettlementWorkflow.run, LateSettlementInput(idempotency_key),
            id=late_settlement_id(idempotency_key), task_queue=self.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"settle {idempotency_key} on an operator's request")

    async def refund(
        self, subscription_id: int, cycle: int, reason: str = "customer refund"
    ) -> RefundOutput:
        carrier_id, key = await asyncio.to_thread(self._check_refundable, subscription_id, cycle)
        carrier = self.registry.carriers[carrier_id]
        # the workflow id is the guard against two refunds racing for the same cycle
        return await self.client.execute_workflow(
            RefundWorkflow.run,
            RefundRequestInput(subscription_id, cycle, reason, carrier.settle_delays(),
                               carrier_id, key, carrier.settle_deadline_seconds,
                               carrier_task_queue(self.task_queue, carrier)),
            id=refund_workflow_id(subscription_id, cycle),
            task_queue=self.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )


class UnsettledOperation(BaseModel):
    idempotency_key: str
    kind: str
    carrier_id: str
    subscription_id: int
    cycle: int
    amount_minor: int
    currency: str
    sends: int
    reported_outcome: str | None
    reason: str | None
    since: datetime


def _unsettled(engine: Engine, carrier_id: str | None) -> list[UnsettledOperation]:
    with Session(engine) as session:
        return [UnsettledOperation(
            idempotency_key=o.idempotency_key, kind=o.kind, carrier_id=o.carrier_id,
            subscription_id=o.subscription_id, cycle=o.cycle, amount_minor=o.amount_minor,
            currency=o.currency, sends=o.sends, reported_outcome=o.reported_outcome,
            reason=o.unsettled_reason, since=o.updated_at)
            for o in operations.unsettled(session, carrier_id)]


def _parse_amount(text: str, currency: str) -> int:
    try:
        return from_decimal(text, currency)
    except MoneyError as exc:
        raise SubscriptionRequestError(str(exc)) from None


async def _cli(args: argparse.Namespace) -> Any:
    client = await SubscriptionClient.connect()
    if args.command == "start":
        request = StartSubscriptionRequest(
            msisdn=args.msisdn, product_id=args.product,
            amount_minor=_parse_amount(args.amount, args.currency), currency=args.currency,
            period=Period(args.period), carrier_id=args.carrier, trial_days=args.trial_days,
        )
        return (await client.start_subscription(request)).model_dump()
    if args.command == "cancel":
        return asdict(await client.cancel_subscription(args.subscription_id))
    if args.command == "describe":
        return (await client.describe_subscription(args.subscription_id)).model_dump()
    if args.command == "refund":
        if args.amount is None and args.request_id is None:
            return asdict(await client.refund(args.subscription_id, args.cycle, args.reason))
        view = await client.describe_subscription(args.subscription_id)
        amount = None if args.amount is None else _parse_amount(args.amount, view.currency)
        return asdict(await client.request_refund(args.subscription_id, args.cycle, amount,
                                                  args.request_id, args.reason))
    if args.command == "pause":
        return asdict(await client.pause(args.subscription_id))
    if args.command == "resume":
        return asdict(await client.resume(args.subscription_id))
    if args.command == "cancel-at-period-end":
        return asdict(await client.cancel_at_period_end(args.subscription_id))
    if args.command == "change-plan":
        return asdict(await client.change_plan(args.subscription_id, args.price_point))
    if args.command == "opt-in":
        return asdict(await client.confirm_opt_in(args.subscription_id, args.pin))
    if args.command == "reconcile":
        day = date.fromisoformat(args.date)
        settings = get_settings()
        carriers = [args.carrier] if args.carrier else sorted(client.registry.carriers)
        if args.run:
            for carrier_id in carriers:
                await reconcile_now(client.client, settings.task_queue, day, carrier_id)
        print(report_for(client.engine, day, args.carrier))
        return None
    if args.command == "history":
        settings = get_settings()
        opensearch = make_client(settings.opensearch_url) if settings.opensearch_url else None
        print(await payment_story(client.engine, args.who, opensearch=opensearch,
                                  temporal=client.client))
        return None
    if args.command == "unsettled":
        return [o.model_dump() for o in await client.unsettled(args.carrier)]
    if args.command == "settle":
        return asdict(await client.settle(args.key))
    raise AssertionError(args.command)


def main() -> None:
    parser = argparse.ArgumentParser(description="Start, describe, cancel and refund subscriptions")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start")
    start.add_argument("--msisdn", required=True)
    start.add_argument("--product", required=True)
    start.add_argument("--amount", required=True, help="in major units, e.g. 4.99")
    start.add_argument("--currency", required=True)
    start.add_argument("--period", required=True, choices=[p.value for p in Period])
    start.add_argument("--carrier")
    start.add_argument("--trial-days", type=int, default=0)
    for name in ("cancel", "describe", "pause", "resume", "cancel-at-period-end"):
        commands.add_parser(name).add_argument("subscription_id", type=int)
    refund = commands.add_parser("refund", help="refund all or part of a charged cycle")
    refund.add_argument("subscription_id", type=int)
    refund.add_argument("cycle", type=int)
    refund.add_argument("--reason", default="customer refund")
    refund.add_argument("--amount", help="a partial refund, in major units, e.g. 1.50")
    refund.add_argument("--request-id", help="the same id never refunds twice")
    change = commands.add_parser("change-plan", help="another price point from the next cycle")
    change.add_argument("subscription_id", type=int)
    change.add_argument("price_point")
    opt_in = commands.add_parser("opt-in", help="the code the subscriber received by SMS")
    opt_in.add_argument("subscription_id", type=int)
    opt_in.add_argument("pin")
    reconcile = commands.add_parser(
        "reconcile", help="the carriers' settlement reports of a day against the ledger")
    reconcile.add_argument("--date", required=True, help="YYYY-MM-DD (UTC)")
    reconcile.add_argument("--carrier")
    reconcile.add_argument("--run", action="store_true",
                           help="reconcile now (else: show the report of the last run)")
    commands.add_parser(
        "history", help="a subscriber's payment story: ledger, interactions, workflow history"
    ).add_argument("who", help="an MSISDN or a subscription id")
    unsettled = commands.add_parser(
        "unsettled", help="operations that may have moved money and have no final answer")
    unsettled.add_argument("--carrier")
    commands.add_parser(
        "settle", help="look one unsettled operation up again (never sends)").add_argument("key")
    args = parser.parse_args()
    try:
        result = asyncio.run(_cli(args))
    except (SubscriptionRequestError, ValidationError) as exc:
        raise SystemExit(f"refused: {exc}") from None
    if result is not None:
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
