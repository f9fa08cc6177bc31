"""Billing activities: thin wrappers that call a carrier adapter and write the ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.messages import (
    CarrierReport,
    ChargeInput,
    ChargeOutput,
    RefundInput,
    RefundOutput,
    StatusInput,
    refund_key,
)
from carriers.base import (
    Capability,
    CarrierAdapter,
    ChargeRequest,
    OperationResult,
    Outcome,
    RefundRequest,
    StatusRequest,
)
from carriers.pool import AdapterPool
from models import ledger
from models.tables import LedgerEntry, LedgerKind, Subscriber, Subscription, SubscriptionStatus

# outcomes that are retried by Temporal with the same idempotency key; PENDING goes back to the
# workflow, which waits on a durable timer (or a callback) before settling
_RETRY_SAME_KEY = {Outcome.TRANSIENT, Outcome.UNKNOWN}


class NotRefundable(ApplicationError):
    def __init__(self, message: str) -> None:
        super().__init__(message, type="NotRefundable", non_retryable=True)


def _retry_same_key(result: OperationResult, operation: str) -> ApplicationError:
    delay = result.retry_after_seconds
    return ApplicationError(
        f"{operation} {result.outcome.value}: {result.carrier_code or ''} {result.message}".strip(),
        type=f"Carrier{result.outcome.value.title()}",
        next_retry_delay=timedelta(seconds=delay) if delay else None,
    )


_FINAL = {Outcome.SUCCEEDED, Outcome.INSUFFICIENT_FUNDS, Outcome.REJECTED}


async def settle_or_send(
    adapter: CarrierAdapter,
    lookup: StatusRequest,
    send: Callable[[], Awaitable[OperationResult]],
    settling: bool,
    reported: CarrierReport | None,
) -> OperationResult:
    """A final result the carrier pushed to us is taken as it is. Otherwise, when an earlier
    answer was pending or lost (a retry), ask the carrier by idempotency key and send again only
    if it has no record. A failed look-up is itself ambiguous, and is retried, never resent.
    (An adapter without a status look-up must be one whose carrier replays a repeated key.)"""
    usable = reported is not None and Outcome(reported.outcome) in _FINAL and (
        reported.outcome != Outcome.SUCCEEDED or reported.carrier_reference)
    if reported is not None and usable:  # (a success we cannot reference is looked up)
        return OperationResult(outcome=Outcome(reported.outcome),
                               carrier_reference=reported.carrier_reference,
                               carrier_code=reported.carrier_code, message=reported.message)
    if (settling or activity.info().attempt > 1) and adapter.supports(Capability.STATUS):
        earlier = await adapter.status(lookup)
        if earlier is not None:
            return earlier
    return await send()


class BillingActivities:
    def __init__(self, engine: Engine, adapters: AdapterPool) -> None:
        self._engine = engine
        self._adapters = adapters

    # -- database helpers, run in a thread so the event loop never blocks --------------------

    def _msisdn(self, subscriber_id: int) -> str:
        with Session(self._engine) as session:
            subscriber = session.get(Subscriber, subscriber_id)
            if subscriber is None:
                raise ApplicationError(
                    f"subscriber {subscriber_id} does not exist", non_retryable=True
                )
            return subscriber.msisdn

    def _ledger_entry(self, key: str) -> LedgerEntry | None:
        with Session(self._engine) as session:
            return ledger.find_by_key(session, key)

    def _append(self, entry: LedgerEntry) -> LedgerEntry:
        with Session(self._engine) as session:
            return ledger.append(session, entry)

    # -- activities ---------------------------------------------------------------------------

    @activity.defn(name="charge_subscription")
    async def charge_subscription(self, charge: ChargeInput) -> ChargeOutput:
        # An earlier attempt may have debited and committed, then lost its completion.
        done = await asyncio.to_thread(self._ledger_entry, charge.idempotency_key)
        if done is not None:
            return ChargeOutput(Outcome.SUCCEEDED.value, done.carrier_reference)
        msisdn = await asyncio.to_thread(self._msisdn, charge.subscriber_id)
        adapter = self._adapters.get(charge.carrier_id)
        request = ChargeRequest(
            idempotency_key=charge.idempotency_key,
            msisdn=msisdn,
            amount_minor=charge.amount_minor,
            currency=charge.currency,
            description=charge.description,
            reference_code=f"S{charge.subscription_id}C{charge.cycle}",
        )
        result = await settle_or_send(
            adapter, StatusRequest(idempotency_key=request.idempotency_key, msisdn=msisdn,
                                   operation="charge"),
            lambda: adapter.charge(request), charge.settling, charge.reported,
        )
        if result.outcome in _RETRY_SAME_KEY:
            raise _retry_same_key(result, "charge")
        if result.outcome is Outcome.SUCCEEDED:
            assert result.carrier_reference is not None
            await asyncio.to_thread(
                self._append,
                LedgerEntry(
                    idempotency_key=charge.idempotency_key,
                    kind=LedgerKind.CHARGE,
                    subscription_id=charge.subscription_id,
                    cycle=charge.cycle,
                    carrier_id=charge.carrier_id,
                    amount_minor=charge.amount_minor,
                    currency=charge.currency,
                    carrier_reference=result.carrier_reference,
                    due_at=charge.due_at,
                ),
            )
        return ChargeOutput(
            result.outcome.value, result.carrier_reference, result.carrier_code, result.message
        )

    def _write_status(self, change: StatusInput) -> None:
        with Session(self._engine) as session:
            subscription = session.get(Subscription, change.subscription_id)
            if subscription is None:
                raise ApplicationError(
                    f"subscription {change.subscription_id} does not exist", non_retryable=True
                )
            subscription.status = SubscriptionStatus(change.status)
            if change.status in (SubscriptionStatus.CANCELLED, SubscriptionStatus.COMPLETED):
                subscription.ended_at = change.at
            session.add(subscription)
            session.commit()

    @activity.defn(name="record_subscription_status")
    async def record_subscription_status(self, change: StatusInput) -> None:
        await asyncio.to_thread(self._write_status, change)

    def _refund_target(self, request: RefundInput) -> tuple[LedgerEntry, str, LedgerEntry | None]:
        with Session(self._engine) as session:
            charge = ledger.charge_for_cycle(session, request.subscription_id, request.cycle)
            if charge is None:
                raise NotRefundable(
                    f"subscription {request.subscription_id} has no charge for cycle {request.cycle}"
                )
            subscription = session.get(Subscription, request.subscription_id)
            assert subscription is not None
            subscriber = session.get(Subscriber, subscription.subscriber_id)
            assert subscriber is not None
            return charge, subscriber.msisdn, ledger.refund_of(session, charge)

    @activity.defn(name="refund_charge")
    async def refund_charge(self, request: RefundInput) -> RefundOutput:
        charge, msisdn, already = await asyncio.to_thread(self._refund_target, request)
        key = refund_key(request.subscription_id, request.cycle)
        if already is not None:
            if already.idempotency_key != key:
                raise NotRefundable(f"charge {charge.idempotency_key} was already refunded")
            return RefundOutput(
                Outcome.SUCCEEDED.value, already.amount_minor, already.currency,
                already.carrier_reference,
            )
        adapter = self._adapters.get(charge.carrier_id)
        if not adapter.supports(Capability.REFUND):
            raise NotRefundable(f"{charge.carrier_id} offers no refunds")
        refund = RefundRequest(
            idempotency_key=key,
            msisdn=msisdn,
            amount_minor=charge.amount_minor,
            currency=charge.currency,
            description=request.reason,
            reference_code=f"R{request.subscription_id}C{request.cycle}",
            original_carrier_reference=charge.carrier_reference,
        )
        result = await settle_or_send(
            adapter, StatusRequest(idempotency_key=key, msisdn=msisdn, operation="refund",
                                   original_carrier_reference=charge.carrier_reference),
            lambda: adapter.refund(refund), request.settling, request.reported,
        )
        if result.outcome in _RETRY_SAME_KEY:
            raise _retry_same_key(result, "refund")
        if result.outcome is Outcome.SUCCEEDED:
            assert result.carrier_reference is not None
            await asyncio.to_thread(
                self._append,
                LedgerEntry(
                    idempotency_key=key,
                    kind=LedgerKind.REFUND,
                    subscription_id=charge.subscription_id,
                    cycle=charge.cycle,
                    carrier_id=charge.carrier_id,
                    amount_minor=charge.amount_minor,
                    currency=charge.currency,
                    carrier_reference=result.carrier_reference,
                    refunds_entry_id=charge.id,
                    due_at=charge.due_at,
                ),
            )
        return RefundOutput(
            result.outcome.value, charge.amount_minor, charge.currency,
            result.carrier_reference, result.carrier_code, result.message,
        )

    def all(self) -> list[Callable[..., Any]]:
        return [self.charge_subscription, self.record_subscription_status, self.refund_charge]
