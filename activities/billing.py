"""Billing activities: thin wrappers that call a carrier adapter and write the ledger.

Every charge and refund is recorded (``CarrierOperation``) before its request leaves, so
whether a call may send is decided by durable state, never by the activity's attempt number:
an operation already sent is only ever settled (``activities/settlement.py``). Activities return
every carrier answer to the workflow, which waits on durable timers between attempts; they
raise only for faults of our own (database, configuration).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import literal as sa_literal
from sqlalchemy import update as sa_update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.messages import (
    OVERFLOW,
    BalanceInput,
    BalanceOutput,
    ChargeInput,
    ChargeOutput,
    LateSettlementInput,
    LateSettlementOutput,
    RefundInput,
    RefundOutput,
    StatusInput,
    UnsettledInput,
    key_prefix,
    refund_key,
)
from activities.settlement import CarrierTerms, settle
from carriers.base import (
    CREDENTIAL_CODES,
    Capability,
    CarrierAdapter,
    ChargeRequest,
    OperationResult,
    Outcome,
    RefundRequest,
    StatusRequest,
)
from carriers.factory import CarrierConfigError
from carriers.gate import CarrierGates
from carriers.http import InteractionRecord
from carriers.loader import Registry
from carriers.pool import AdapterPool
from carriers.reports import CarrierReport
from models import ledger
from models import operations as ops
from models.db import in_db_thread
from models.interactions import add_interactions
from models.interactions import held as held_interactions
from models.operations import OperationConflict, OperationSpec
from models.tables import (
    CarrierOperation,
    LedgerEntry,
    LedgerKind,
    OperationState,
    Subscriber,
    Subscription,
    SubscriptionStatus,
    utcnow,
)
from rules.caps import first_refusal
from rules.spend import spend_so_far
from rules.types import Refusal
from traceability.documents import (
    remember_operation,
    remember_subscription,
    rule_decision_document,
)
from traceability.outbox import enqueue

log = logging.getLogger(__name__)

_FINAL = {Outcome.SUCCEEDED, Outcome.INSUFFICIENT_FUNDS, Outcome.REJECTED}
# a refund asking for "whatever is left" of a charge already wholly refunded: nothing sent
NOTHING_LEFT = "nothing_left"


class NotRefundable(ApplicationError):
    def __init__(self, message: str) -> None:
        super().__init__(message, type="NotRefundable", non_retryable=True)


class ConfigurationError(ApplicationError):
    """Our own mistake (unknown carrier, missing secret, a key reused, facts that contradict
    the ledger): retrying cannot fix it, and an operator must look."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="ConfigurationError", non_retryable=True)


@contextmanager
def _configuration_errors() -> Iterator[None]:
    try:
        yield
    except (KeyError, CarrierConfigError, ledger.LedgerConflict, OperationConflict,
            AssertionError) as exc:
        raise ConfigurationError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class _Context:
    """What one call knows before talking to the carrier, read in one database session."""

    msisdn: str
    operation: CarrierOperation
    may_send: bool
    ledger_entry: LedgerEntry | None
    original_reference: str | None = None


def _reported(operation: CarrierOperation, relayed: CarrierReport | None) -> CarrierReport | None:
    """The pushed result to settle by: a final one first (the one relayed with this call, or
    the one stored, which may be newer), else whichever there is."""
    if relayed is not None and relayed.carrier_id not in ("", operation.carrier_id):
        relayed = None
    stored = None if operation.reported_outcome is None else CarrierReport(
        idempotency_key=operation.idempotency_key, outcome=operation.reported_outcome,
        carrier_reference=operation.reported_reference, carrier_code=operation.reported_code,
        carrier_id=operation.carrier_id)
    candidates = [r for r in (relayed, stored) if r is not None]
    final = [r for r in candidates if r.outcome in ops.FINAL_OUTCOMES]
    chosen = final or candidates
    return chosen[0] if chosen else None


def _credentials_refused(result: OperationResult) -> bool:
    return result.outcome is Outcome.TRANSIENT and result.carrier_code in CREDENTIAL_CODES


class BillingActivities:
    def __init__(self, engine: Engine, adapters: AdapterPool, registry: Registry,
                 deployment_id: str = "dev", gates: CarrierGates | None = None) -> None:
        self._engine = engine
        self._adapters = adapters
        self._registry = registry
        self._deployment_id = deployment_id
        # (None: no pacing here; the carrier queues' slots and rate limits alone)
        self._gates = gates

    # -- shared money path --------------------------------------------------------------------

    def _begin(self, spec: OperationSpec, subscriber_id: int | None,
               guard: Callable[[Session, Subscriber], Refusal | None] | None = None,
               may_send: bool = True) -> _Context | Refusal:
        with Session(self._engine, expire_on_commit=False) as session:
            # read once: whether the key is new decides the guard, and the reservation
            # starts from it (a new key reserved meanwhile fails on its unique index)
            existing = ops.find(session, spec.idempotency_key)
            # a new charge: the subscriber's row is locked (PostgreSQL) while the caps are
            # read and the operation recorded, so two subscriptions cannot both slip under
            guarded = guard is not None and existing is None
            if guarded:
                # a no-op write locks the subscriber's row (PostgreSQL) or the database for
                # writing (SQLite, which ignores FOR UPDATE) until the operation is recorded
                session.execute(sa_update(Subscriber).where(col(Subscriber.id) == subscriber_id)
                                .values(id=Subscriber.id))
            subscription, subscriber = _subscription_and_subscriber(
                session, spec.subscription_id, subscriber_id)
            if guard is not None and guarded:
                refusal = guard(session, subscriber)
                if refusal is not None:
                    session.rollback()
                    return refusal
            done = ledger.find_by_key(session, spec.idempotency_key)
            msisdn = subscriber.msisdn
            original = None
            if spec.kind is LedgerKind.REFUND:
                charge = ledger.charge_refunded_by(session, spec.idempotency_key,
                                                   spec.subscription_id, spec.cycle)
                original = charge.carrier_reference if charge else None
            # documents written during the call and at its conclusion need not read them again
            remember_subscription(session, subscription, subscriber)
            # (a settlement that never sends must not claim a refused operation for a resend)
            reservation = ops.reserve_found(session, spec, existing, claim=may_send)
            remember_operation(session, reservation.operation)
            return _Context(msisdn, reservation.operation,
                            reservation.may_send and done is None, done, original)

    def _terms(self, carrier_id: str, adapter: CarrierAdapter) -> CarrierTerms:
        return CarrierTerms.of(adapter, self._registry.carriers[carrier_id].promises)

    def _claim_resend(self, key: str, seen_sends: int) -> bool:
        with Session(self._engine, expire_on_commit=False) as session:
            # (unsettled: a refund asked for again after its settlement was abandoned)
            return ops.claim_resend(session, key, (OperationState.SENDING,
                                                   OperationState.PENDING,
                                                   OperationState.UNSETTLED), seen_sends)

    async def _resend_with(self, key: str, seen_sends: int,
                           send: Callable[[], Awaitable[OperationResult]]) -> OperationResult:
        """Sends again only if no one sent it since we read it (``seen_sends``)."""
        if not await in_db_thread(self._engine, self._claim_resend, key, seen_sends):
            return OperationResult(outcome=Outcome.UNKNOWN,
                                   message="another attempt holds this operation")
        return await send()

    def _conclude(self, operation: CarrierOperation, result: OperationResult,
                  refunds_entry_id: int | None = None,
                  list_price_minor: int | None = None,
                  exchanges: list[InteractionRecord] | None = None) -> None:
        """Writes what the answer means: the ledger entry and the settled record for a final
        answer; retryable after an outright refusal; pending otherwise. One transaction: the
        ledger entry (with its document) and the held ``exchanges`` commit with the
        operation's transition (a key already in the ledger rolls back at once, before the
        exchanges are added, and the transition commits with them)."""
        key = operation.idempotency_key
        with Session(self._engine, expire_on_commit=False) as session:
            if result.outcome is Outcome.SUCCEEDED:
                if not result.carrier_reference:
                    raise ConfigurationError(f"{key}: a success without the carrier's reference")
                try:
                    ledger.append(session, LedgerEntry(
                        idempotency_key=key, kind=operation.kind,
                        subscription_id=operation.subscription_id, cycle=operation.cycle,
                        carrier_id=operation.carrier_id, amount_minor=operation.amount_minor,
                        currency=operation.currency, carrier_reference=result.carrier_reference,
                        refunds_entry_id=refunds_entry_id, due_at=operation.due_at,
                        list_price_minor=list_price_minor), commit=False)
                except ledger.LedgerConflict:
                    # reconciliation put the key in the ledger from the carrier's report
                    # (its amount is what the carrier took): that entry stands, the answer
                    # only settles the operation
                    found = ledger.find_by_key(session, key)
                    if found is None or found.kind != LedgerKind.RECONCILED:
                        raise
                # (a success is final: the transition below commits the entry with it)
            add_interactions(session, exchanges or [])
            if result.outcome in _FINAL:
                ops.transition(session, key, OperationState.SETTLED,
                               outcome=result.outcome.value,
                               carrier_reference=result.carrier_reference,
                               carrier_code=result.carrier_code, message=result.message[:500])
            elif result.outcome is Outcome.TRANSIENT:
                ops.transition(session, key, OperationState.RETRYABLE,
                               allowed_from=(OperationState.SENDING,),
                               carrier_code=result.carrier_code, message=result.message[:500])
            else:
                # may have moved money: never "did nothing" again, and the carrier's reference
                # (proof it took the request) is kept
                facts: dict[str, object] = {"ambiguous": True,
                                            "carrier_code": result.carrier_code,
                                            "message": result.message[:500]}
                if result.carrier_reference:
                    facts["carrier_reference"] = result.carrier_reference
                ops.transition(session, key, OperationState.PENDING,
                               allowed_from=(OperationState.SENDING, OperationState.PENDING),
                               **facts)
        if exchanges:
            exchanges.clear()  # committed with the transition

    def _settled_answer(self, operation: CarrierOperation, entry: LedgerEntry | None
                        ) -> OperationResult | None:
        """The answer an earlier attempt already got and wrote, if any."""
        if entry is not None:
            if operation.state != OperationState.SETTLED:
                with Session(self._engine, expire_on_commit=False) as session:
                    ops.transition(session, entry.idempotency_key, OperationState.SETTLED,
                                   outcome=Outcome.SUCCEEDED.value,
                                   carrier_reference=entry.carrier_reference)
            return OperationResult(outcome=Outcome.SUCCEEDED,
                                   carrier_reference=entry.carrier_reference)
        if operation.state == OperationState.SETTLED and operation.outcome is not None:
            return OperationResult(outcome=Outcome(operation.outcome),
                                   carrier_reference=operation.carrier_reference,
                                   carrier_code=operation.carrier_code, message=operation.message)
        return None

    def _report_credentials(self, carrier_id: str, result: OperationResult) -> None:
        log.error("carrier %s refused our credentials (%s): rotate or fix them; charges wait",
                  carrier_id, result.carrier_code)
        with _suppress_outside_activity():
            activity.metric_meter().create_counter(
                "carrier_credentials_rejected", "carrier answers refusing our credentials",
            ).add(1, {"carrier": carrier_id})

    @staticmethod
    def _resend_hold(operation: CarrierOperation, terms: CarrierTerms) -> str | None:
        """Why this operation may not be sent again now, if it may not. (Wall-clock time: the
        carrier takes real seconds to show what it took, whatever a workflow's clock says.)"""
        if operation.carrier_reference or operation.reported_outcome:
            return "the carrier acknowledged it; it is only ever settled"
        if operation.last_sent_at is None:
            return "when it was last sent is not known"
        elapsed = (utcnow() - _aware(operation.last_sent_at)).total_seconds()
        if elapsed < terms.visible_within_seconds:
            return (f"last sent {elapsed:.0f} s ago; this carrier may take "
                    f"{terms.visible_within_seconds:.0f} s to show what it took")
        return None

    async def _run(self, spec: OperationSpec, subscriber_id: int | None,
                   send: Callable[[str, str | None], Awaitable[OperationResult]],
                   reported: CarrierReport | None, may_send: bool = True,
                   guard: Callable[[Session, Subscriber], Refusal | None] | None = None
                   ) -> tuple[OperationResult, CarrierOperation, str | None] | Refusal:
        with _configuration_errors():
            # a carrier we cannot call is found out before anything is recorded or sent
            adapter = self._adapters.get(spec.carrier_id)
            context = await in_db_thread(self._engine, self._begin, spec, subscriber_id, guard,
                                         may_send)
            if isinstance(context, Refusal):
                return context
            operation = context.operation
            # (a hop to the database thread only when there is something to write)
            earlier = (await in_db_thread(self._engine, self._settled_answer, operation,
                                          context.ledger_entry)
                       if context.ledger_entry is not None
                       else self._settled_answer(operation, None))
            if earlier is not None:
                return earlier, operation, context.original_reference
            msisdn, original = context.msisdn, context.original_reference
            if context.may_send and may_send:
                result = await send(msisdn, original)
            else:
                terms = self._terms(spec.carrier_id, adapter)
                lookup = StatusRequest(
                    idempotency_key=spec.idempotency_key, msisdn=msisdn,
                    operation=spec.kind.value, original_carrier_reference=original,
                    sent_at=_aware(operation.created_at),
                    last_sent_at=_aware(operation.last_sent_at) if operation.last_sent_at
                    else None)
                held = ("a late settlement never sends" if not may_send
                        else self._resend_hold(operation, terms))
                resend = None if held else (lambda: self._resend_with(
                    spec.idempotency_key, operation.sends, lambda: send(msisdn, original)))
                result = await settle(adapter, terms, lookup, _reported(operation, reported),
                                      resend, held or "")
            if _credentials_refused(result):
                self._report_credentials(spec.carrier_id, result)
            return result, operation, original

    # -- activities ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _carrier_slot(self, carrier_id: str) -> AsyncIterator[None]:
        """One of the carrier's slots in this worker, waited for (refunds and look-ups share
        them with charges)."""
        if self._gates is None:
            yield
            return
        with _configuration_errors():
            gate = self._gates.of(carrier_id)
        await gate.enter_queued()
        try:
            yield
        finally:
            await gate.leave()

    @activity.defn(name="charge_subscription")
    async def charge_subscription(self, charge: ChargeInput) -> ChargeOutput:
        """Run as a local activity first: with no free slot or token for its carrier in this
        worker it sends and records nothing, and answers ``overflow`` (the workflow sends it
        to the carrier's queue). On the carrier's queue it waits for a slot."""
        if self._gates is None:
            return await self._charge(charge)
        with _configuration_errors():  # (a carrier we do not know: nothing is sent)
            gate = self._gates.of(charge.carrier_id)
        if activity.info().is_local:
            if not gate.try_enter_local():
                return ChargeOutput(OVERFLOW, message="no local slot or token: via the queue")
            try:
                return await self._charge(charge)
            finally:
                await gate.leave(local=True)
        async with self._carrier_slot(charge.carrier_id):
            return await self._charge(charge)

    async def _charge(self, charge: ChargeInput) -> ChargeOutput:
        spec = OperationSpec(
            idempotency_key=charge.idempotency_key, kind=LedgerKind.CHARGE,
            carrier_id=charge.carrier_id, workflow_id=_workflow_id(),
            subscription_id=charge.subscription_id, cycle=charge.cycle,
            amount_minor=charge.amount_minor, currency=charge.currency, due_at=charge.due_at)

        async def send(msisdn: str, _original: str | None) -> OperationResult:
            adapter = self._adapters.get(charge.carrier_id)
            return await adapter.charge(ChargeRequest(
                idempotency_key=charge.idempotency_key, msisdn=msisdn,
                amount_minor=charge.amount_minor, currency=charge.currency,
                description=charge.description,
                reference_code=f"S{charge.subscription_id}C{charge.cycle}"))

        rules = charge.rules

        def within_caps(session: Session, subscriber: Subscriber) -> Refusal | None:
            if rules is None:
                return None
            assert subscriber.id is not None
            spent = spend_so_far(session, subscriber.id, charge.subscription_id,
                                 _aware(charge.due_at), rules.timezone)
            in_flight = ops.charges_in_flight_minor(session, subscriber.id)
            spent = replace(spent, day_minor=spent.day_minor + in_flight,
                            week_minor=spent.week_minor + in_flight,
                            month_minor=spent.month_minor + in_flight)
            return first_refusal(charge.amount_minor, spent, rules, charge.is_subscription)

        if charge.decisions:
            await in_db_thread(self._engine, self._record_decisions, charge)
        # the carrier exchanges commit with the conclusion (or on their own if it fails)
        async with held_interactions(self._engine) as exchanges:
            # no rules, no caps: nothing to serialise, so the subscriber's row is not locked
            ran = await self._run(spec, charge.subscriber_id, send, charge.reported,
                                  guard=within_caps if rules is not None else None)
            if isinstance(ran, Refusal):
                await in_db_thread(self._engine, self._record_decisions, charge, ran)
                return ChargeOutput("refused_by_rule", message=f"{ran.rule}: {ran.figure}",
                                    refusal=ran)
            result, operation, _ = ran
            conclusion = asyncio.ensure_future(in_db_thread(
                self._engine, self._conclude, operation, result, None, charge.list_price_minor,
                exchanges))
            with _configuration_errors():
                try:
                    await asyncio.shield(conclusion)
                except asyncio.CancelledError:
                    # the conclusion already running decides what was written (it empties
                    # the held exchanges once they commit): wait for it, then stop
                    await asyncio.wait({conclusion})
                    raise
        return ChargeOutput(
            result.outcome.value, result.carrier_reference, result.carrier_code, result.message,
            result.retry_after_seconds,
            "credentials_rejected" if _credentials_refused(result) else None)

    def _record_decisions(self, charge: ChargeInput, refusal: Refusal | None = None) -> None:
        """The rules' decisions before this charge, and a cap refusing it, for the interaction
        store (each under an id of its own, so a retried activity overwrites, never adds)."""
        # (a charge a cap refused is tried again later under the same key: the moment is part
        # of each decision's id, so every decision is one document in one daily index)
        notes = [(f"{charge.idempotency_key}-n{i}-{_aware(n.at):%Y%m%dT%H%M%S}", n.kind, n.rule,
                  n.detail, n.at) for i, n in enumerate(charge.decisions)]
        if refusal is not None:
            notes.append((f"{charge.idempotency_key}-refused-{_aware(charge.due_at):%Y%m%dT%H%M%S}",
                          "refused", refusal.rule, f"{refusal.rule}: {refusal.figure}",
                          charge.due_at))
        if not notes:
            return
        with Session(self._engine) as session:
            for key, kind, rule, detail, at in notes:
                enqueue(session, rule_decision_document(
                    session, idempotency_key=key, carrier_id=charge.carrier_id,
                    subscription_id=charge.subscription_id, rule=rule, outcome=kind,
                    at=_aware(at), cycle=charge.cycle, amount_minor=charge.amount_minor,
                    currency=charge.currency, detail=detail))
            session.commit()

    def _write_status(self, change: StatusInput) -> None:
        with Session(self._engine, expire_on_commit=False) as session:
            subscription = session.get(Subscription, change.subscription_id)
            if subscription is None:
                raise ConfigurationError(f"subscription {change.subscription_id} does not exist")
            if subscription.status in ENDED and change.status not in ENDED:
                # a retried write of a live status (a pause) landing after the end
                log.warning("subscription %s has ended (%s): %s not written",
                            change.subscription_id, subscription.status, change.status)
                return
            subscription.status = SubscriptionStatus(change.status)
            if change.status in ENDED:
                subscription.ended_at = change.at
            session.add(subscription)
            session.commit()

    @activity.defn(name="record_subscription_status")
    async def record_subscription_status(self, change: StatusInput) -> None:
        await in_db_thread(self._engine, self._write_status, change)

    def _refund_target(self, request: RefundInput
                       ) -> tuple[LedgerEntry, str, LedgerEntry | None, int, int | None]:
        """The charge a refund returns (named by its key), its key, the refund if already in
        the ledger, what is left to refund of the charge (refunds in the ledger and in flight
        taken off) and the amount this key was first sent with, if it was."""
        with Session(self._engine, expire_on_commit=False) as session:
            subscription = session.get(Subscription, request.subscription_id)
            if subscription is None:
                raise ConfigurationError(f"subscription {request.subscription_id} does not exist")
            key = request.idempotency_key or refund_key(
                key_prefix(self._deployment_id, subscription.key_token), request.cycle)
            charge = ledger.charge_refunded_by(session, key, request.subscription_id,
                                               request.cycle)
            if charge is None:
                raise NotRefundable(
                    f"subscription {request.subscription_id} has no charge for cycle {request.cycle}"
                )
            left = (charge.amount_minor - ledger.refunded_minor(session, charge)
                    - ops.refunds_in_flight_minor(session, request.subscription_id,
                                                  request.cycle, key))
            sent = ops.find(session, key)
            return (charge, key, ledger.find_by_key(session, key), left,
                    sent.amount_minor if sent is not None else None)

    @activity.defn(name="refund_charge")
    async def refund_charge(self, request: RefundInput) -> RefundOutput:
        """Refunds (part of) one charge. Never more than is left of it: refunds already in the
        ledger and those still in flight are taken off first."""
        charge, key, done, left, sent_amount = await in_db_thread(
            self._engine, self._refund_target, request)
        if done is not None:
            return RefundOutput(Outcome.SUCCEEDED.value, done.amount_minor, done.currency,
                                done.carrier_reference)
        adapter = self._adapters.get(charge.carrier_id)
        if not adapter.supports(Capability.REFUND):
            raise NotRefundable(f"{charge.carrier_id} offers no refunds")
        if sent_amount is not None:
            amount = sent_amount  # this key was sent before: only ever settled, as it was
        else:
            amount = left if request.amount_minor is None else request.amount_minor
            if request.at_most:
                amount = min(amount, left)
            if (request.amount_minor is None or request.at_most) and amount <= 0:
                return RefundOutput(NOTHING_LEFT, 0, charge.currency,
                                    message="nothing is left to refund of this charge")
            if not 0 < amount <= left:
                raise NotRefundable(f"a refund of {amount} when {max(left, 0)} of the charge "
                                    f"{charge.idempotency_key} is left to refund")
        spec = OperationSpec(
            idempotency_key=key, kind=LedgerKind.REFUND, carrier_id=charge.carrier_id,
            workflow_id=_workflow_id(), subscription_id=charge.subscription_id,
            cycle=charge.cycle, amount_minor=amount, currency=charge.currency,
            due_at=charge.due_at)

        async def send(msisdn: str, _original: str | None) -> OperationResult:
            return await adapter.refund(RefundRequest(
                idempotency_key=key, msisdn=msisdn, amount_minor=amount,
                currency=charge.currency, description=request.reason,
                reference_code=f"R{request.subscription_id}C{request.cycle}",
                original_carrier_reference=charge.carrier_reference,
                original_amount_minor=charge.amount_minor))

        async with self._carrier_slot(charge.carrier_id):
            ran = await self._run(spec, None, send, request.reported)
        assert not isinstance(ran, Refusal)
        result, operation, _ = ran
        with _configuration_errors():
            await in_db_thread(self._engine, self._conclude, operation, result, charge.id)
        return RefundOutput(
            result.outcome.value, amount, charge.currency,
            result.carrier_reference, result.carrier_code, result.message,
            result.retry_after_seconds,
            "credentials_rejected" if _credentials_refused(result) else None)

    def _msisdn(self, subscriber_id: int) -> str:
        with Session(self._engine) as session:
            subscriber = session.get(Subscriber, subscriber_id)
            if subscriber is None:
                raise ConfigurationError(f"subscriber {subscriber_id} does not exist")
            return subscriber.msisdn

    @activity.defn(name="check_balance")
    async def check_balance(self, request: BalanceInput) -> BalanceOutput:
        """What the subscriber can spend, where the carrier says; moves no money, so any
        failure is an answer of "unknown" rather than a retry."""
        with _configuration_errors():
            adapter = self._adapters.get(request.carrier_id)
        if not adapter.supports(Capability.BALANCE):
            return BalanceOutput(None, f"{request.carrier_id} offers no balance look-up")
        msisdn = await in_db_thread(self._engine, self._msisdn, request.subscriber_id)
        try:
            async with self._carrier_slot(request.carrier_id):
                answer = await adapter.balance(msisdn, request.currency)
        except Exception as exc:  # a look-up that failed says nothing
            return BalanceOutput(None, f"balance look-up failed: {type(exc).__name__}")
        if answer.outcome is not Outcome.SUCCEEDED or answer.amount_minor is None or (
                answer.currency not in (None, request.currency)):
            return BalanceOutput(None, answer.message or answer.outcome.value)
        return BalanceOutput(answer.amount_minor)

    # -- operations left unsettled ------------------------------------------------------------

    def _mark_unsettled(self, request: UnsettledInput) -> CarrierOperation | None:
        with Session(self._engine, expire_on_commit=False) as session:
            reason = request.reason[:500]
            # sent (or maybe sent) and unanswered: ambiguous for good. Refused outright and
            # never accepted (a refund owed): not ambiguous, so asking again may send it
            if not ops.transition(session, request.idempotency_key, OperationState.UNSETTLED,
                                  allowed_from=(OperationState.SENDING, OperationState.PENDING),
                                  unsettled_reason=reason, ambiguous=True):
                ops.transition(session, request.idempotency_key, OperationState.UNSETTLED,
                               allowed_from=(OperationState.RETRYABLE,), unsettled_reason=reason)
            # read after writing: a result the relay stored meanwhile is seen here, or the
            # relay sees UNSETTLED and starts a late settlement (it also writes, then reads)
            return ops.find(session, request.idempotency_key)

    @activity.defn(name="record_unsettled_operation")
    async def record_unsettled_operation(self, request: UnsettledInput
                                         ) -> LateSettlementOutput | None:
        """The operation may have moved money and has no final answer: list it for operators
        and for the late results and reconciliation that will settle it. A result the carrier
        pushed while the workflow was giving up is applied now."""
        operation = await in_db_thread(self._engine, self._mark_unsettled, request)
        if operation is None or operation.reported_outcome is None \
                or operation.state != OperationState.UNSETTLED:
            return None
        try:
            return await self.settle_unsettled_operation(
                LateSettlementInput(request.idempotency_key))
        except Exception as exc:  # listed with its report: `starter.py settle` applies it
            log.warning("%s: the result pushed meanwhile is kept, not applied yet: %s",
                        request.idempotency_key, exc)
            return None

    def _load(self, key: str) -> CarrierOperation:
        with Session(self._engine, expire_on_commit=False) as session:
            operation = ops.find(session, key)
            if operation is None:
                raise ConfigurationError(f"no operation with key {key}")
            return operation

    @activity.defn(name="settle_unsettled_operation")
    async def settle_unsettled_operation(self, request: LateSettlementInput
                                         ) -> LateSettlementOutput:
        """Settles a listed operation by a late pushed result or a look-up. Never sends."""
        operation = await in_db_thread(self._engine, self._load, request.idempotency_key)
        if operation.state not in (OperationState.UNSETTLED, OperationState.SETTLED):
            return LateSettlementOutput(operation.idempotency_key, OperationState(operation.state).value,
                                        message="its workflow is still settling it")
        spec = OperationSpec(
            idempotency_key=operation.idempotency_key, kind=LedgerKind(operation.kind),
            carrier_id=operation.carrier_id, workflow_id=operation.workflow_id,
            subscription_id=operation.subscription_id, cycle=operation.cycle,
            amount_minor=operation.amount_minor, currency=operation.currency,
            due_at=operation.due_at)

        async def never(_msisdn: str, _original: str | None) -> OperationResult:
            raise ConfigurationError("a late settlement never sends")

        ran = await self._run(spec, None, never, request.reported, may_send=False)
        assert not isinstance(ran, Refusal)
        result, operation, _ = ran
        if result.outcome not in _FINAL:
            # a final result stored while this ran (the relay attaches later results to a
            # settlement already running) is read now rather than waiting for another
            fresh = await in_db_thread(self._engine, self._load, request.idempotency_key)
            if fresh.reported_outcome in ops.FINAL_OUTCOMES and (
                    fresh.reported_outcome != operation.reported_outcome):
                again = await self._run(spec, None, never, None, may_send=False)
                assert not isinstance(again, Refusal)
                result, operation, _ = again
        if result.outcome in _FINAL:
            refunds_entry_id = None
            if operation.kind == LedgerKind.REFUND:
                refunds_entry_id = await in_db_thread(self._engine, self._charge_entry_id, operation)
            with _configuration_errors():
                await in_db_thread(self._engine, self._conclude, operation, result, refunds_entry_id)
        settled = await in_db_thread(self._engine, self._load, request.idempotency_key)
        remaining = await in_db_thread(self._engine, self._unsettled_count, settled.subscription_id)
        return LateSettlementOutput(settled.idempotency_key, OperationState(settled.state).value,
                                    settled.outcome, settled.carrier_reference, result.message,
                                    settled.workflow_id, remaining, settled.amount_minor)

    def _unsettled_count(self, subscription_id: int) -> int:
        with Session(self._engine) as session:
            return len(ops.unsettled_charges(session, subscription_id))

    def _charge_entry_id(self, operation: CarrierOperation) -> int | None:
        with Session(self._engine, expire_on_commit=False) as session:
            charge = ledger.charge_refunded_by(session, operation.idempotency_key,
                                               operation.subscription_id, operation.cycle)
            return charge.id if charge else None

    def all(self) -> list[Callable[..., Any]]:
        return [self.charge_subscription, self.record_subscription_status, self.refund_charge,
                self.record_unsettled_operation, self.settle_unsettled_operation,
                self.check_balance]

    def carrier_calls(self) -> list[Callable[..., Any]]:
        """What runs on a carrier's own task queue: the calls that wait on that carrier."""
        return [self.charge_subscription, self.refund_charge, self.check_balance]


def _subscription_and_subscriber(session: Session, subscription_id: int,
                                 subscriber_id: int | None) -> tuple[Subscription, Subscriber]:
    """A subscription and its subscriber (``subscriber_id``, else the subscription's own), in
    one query; a missing one is our own mistake."""
    subscriber_key = (col(Subscription.subscriber_id) if subscriber_id is None
                      else sa_literal(subscriber_id))
    found = session.exec(
        select(Subscription, Subscriber)
        .outerjoin(Subscriber, col(Subscriber.id) == subscriber_key)
        .where(col(Subscription.id) == subscription_id)).first()
    if found is None:
        raise ConfigurationError(f"subscription {subscription_id} does not exist")
    subscription, subscriber = found
    if subscriber is None:
        raise ConfigurationError(
            f"subscriber {subscriber_id or subscription.subscriber_id} does not exist")
    return subscription, subscriber


def _aware(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes for what was stored in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


ENDED = (SubscriptionStatus.CANCELLED, SubscriptionStatus.COMPLETED,
         SubscriptionStatus.OPT_IN_EXPIRED)


def _workflow_id() -> str:
    workflow_id = activity.info().workflow_id
    if not workflow_id:
        raise ConfigurationError("billing activities run only for a workflow")
    return workflow_id


@contextmanager
def _suppress_outside_activity() -> Iterator[None]:
    try:
        yield
    except RuntimeError:  # not in an activity (direct calls in tests)
        pass
