"""The durable record of each charge and refund we send (``CarrierOperation``).

Every state change is one conditional UPDATE, so two processes (a retried activity, a callback
receiver, a late settlement) can never overwrite each other's answer: a settled operation stays
settled, and only an operation the carrier refused outright may be sent again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from models.db import insert_row
from models.tables import CarrierOperation, LedgerKind, OperationState, Subscription, utcnow


@dataclass(frozen=True)
class OperationSpec:
    """What an operation is, fixed when it is first reserved."""

    idempotency_key: str
    kind: LedgerKind
    carrier_id: str
    workflow_id: str
    subscription_id: int
    cycle: int
    amount_minor: int
    currency: str
    due_at: datetime


@dataclass(frozen=True)
class Reservation:
    operation: CarrierOperation
    # whether the caller may send the request now: first use of the key, or the carrier
    # said the previous send did nothing
    may_send: bool


OPEN_STATES = (OperationState.SENDING, OperationState.PENDING, OperationState.RETRYABLE,
               OperationState.UNSETTLED)


def find(session: Session, key: str) -> CarrierOperation | None:
    return session.exec(
        select(CarrierOperation).where(CarrierOperation.idempotency_key == key)).first()


def reserve(session: Session, spec: OperationSpec) -> Reservation:
    """Records the operation before anything is sent (state SENDING), or claims a retryable
    one for one more send. Anything else is for settling, never for sending."""
    return reserve_found(session, spec, find(session, spec.idempotency_key))


def reserve_found(session: Session, spec: OperationSpec,
                  existing: CarrierOperation | None, claim: bool = True) -> Reservation:
    """``reserve``, the operation under the key (or its absence) already read in ``session``
    (``find``). Read earlier or not, a second reservation of a new key still fails on the
    key's unique index and yields to the first."""
    if existing is None:
        row = CarrierOperation(
            idempotency_key=spec.idempotency_key, kind=spec.kind, carrier_id=spec.carrier_id,
            workflow_id=spec.workflow_id, subscription_id=spec.subscription_id, cycle=spec.cycle,
            amount_minor=spec.amount_minor, currency=spec.currency, due_at=spec.due_at,
            state=OperationState.SENDING, sends=1, last_sent_at=utcnow())
        try:
            insert_row(session, row)
            session.commit()
        except IntegrityError:  # another attempt reserved it first: it owns the send
            session.rollback()
            existing = find(session, spec.idempotency_key)
            assert existing is not None
            return Reservation(existing, False)
        return Reservation(row, True)
    if (existing.carrier_id, existing.amount_minor, existing.currency, existing.kind) != (
            spec.carrier_id, spec.amount_minor, spec.currency, spec.kind):
        raise OperationConflict(
            f"key {spec.idempotency_key} is already used for {existing.kind} "
            f"{existing.amount_minor} {existing.currency} on {existing.carrier_id}")
    # refused outright before (or listed as owed after being refused outright): nothing
    # happened at the carrier, so it may be sent again
    never_taken = not existing.ambiguous and not existing.carrier_reference \
        and existing.reported_outcome is None
    if claim and existing.state in (OperationState.RETRYABLE, OperationState.UNSETTLED) \
            and never_taken and claim_resend(session, existing.idempotency_key,
                                             (OperationState(existing.state),), existing.sends):
        session.refresh(existing)
        return Reservation(existing, True)
    return Reservation(existing, False)


def claim_resend(session: Session, key: str, allowed_from: Sequence[OperationState],
                 seen_sends: int | None = None) -> bool:
    """Moves the operation to SENDING for one more send, if it is still in one of
    ``allowed_from`` (and, given ``seen_sends``, still sent that many times: two attempts that
    read it alike cannot both claim it); False if anyone else moved it first."""
    table = CarrierOperation.__table__  # type: ignore[attr-defined]
    unchanged = [] if seen_sends is None else [table.c.sends == seen_sends]
    result = session.execute(
        sa.update(table)
        .where(table.c.idempotency_key == key, table.c.state.in_([s.value for s in allowed_from]),
               *unchanged)
        .values(state=OperationState.SENDING.value, sends=table.c.sends + 1,
                last_sent_at=utcnow(), updated_at=utcnow()))
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


class OperationConflict(RuntimeError):
    """A key reused for a different operation: a configuration or code error, never retried."""


def transition(session: Session, key: str, state: OperationState, *,
               allowed_from: Sequence[OperationState] = OPEN_STATES, **facts: object) -> bool:
    """Moves an open operation to ``state`` with ``facts`` (outcome, reference, code...).
    A settled operation never changes again."""
    table = CarrierOperation.__table__  # type: ignore[attr-defined]
    result = session.execute(
        sa.update(table)
        .where(table.c.idempotency_key == key,
               table.c.state.in_([s.value for s in allowed_from]))
        .values(state=state.value, updated_at=utcnow(), **facts))
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


FINAL_OUTCOMES = ("succeeded", "insufficient_funds", "rejected")


def store_report(session: Session, key: str, outcome: str, reference: str | None,
                 code: str | None) -> bool:
    """Keeps a pushed result durably on the open operation, so it is read even if the signal
    that announced it reaches no one (worker restarting, workflow closed). A final result is
    never replaced by a pending one (a duplicate or late "processing" callback)."""
    table = CarrierOperation.__table__  # type: ignore[attr-defined]
    keeps_final = sa.true() if outcome in FINAL_OUTCOMES else sa.or_(
        table.c.reported_outcome.is_(None), table.c.reported_outcome.not_in(FINAL_OUTCOMES))
    result = session.execute(
        sa.update(table)
        .where(table.c.idempotency_key == key, table.c.state != OperationState.SETTLED.value,
               keeps_final)
        .values(reported_outcome=outcome, reported_reference=reference, reported_code=code,
                reported_at=utcnow(), updated_at=utcnow()))
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def unsettled(session: Session, carrier_id: str | None = None) -> list[CarrierOperation]:
    query = select(CarrierOperation).where(
        CarrierOperation.state == OperationState.UNSETTLED).order_by(
        col(CarrierOperation.created_at))
    if carrier_id is not None:
        query = query.where(CarrierOperation.carrier_id == carrier_id)
    return list(session.exec(query).all())


def unsettled_charges(session: Session, subscription_id: int) -> list[CarrierOperation]:
    return list(session.exec(select(CarrierOperation).where(
        CarrierOperation.subscription_id == subscription_id,
        CarrierOperation.kind == LedgerKind.CHARGE,
        CarrierOperation.state == OperationState.UNSETTLED)).all())


def charges_in_flight_minor(session: Session, subscriber_id: int) -> int:
    """What the subscriber's charges that may still debit add up to (sent, not yet answered):
    spend caps count them, so two subscriptions cannot both slip under a cap."""
    total = session.exec(
        select(sa.func.coalesce(sa.func.sum(CarrierOperation.amount_minor), 0))
        .join(Subscription, col(Subscription.id) == col(CarrierOperation.subscription_id))
        .where(Subscription.subscriber_id == subscriber_id,
               CarrierOperation.kind == LedgerKind.CHARGE,
               col(CarrierOperation.state).in_([OperationState.SENDING, OperationState.PENDING,
                                                OperationState.UNSETTLED]))
    ).one()
    return int(total)


def refunds_in_flight_minor(session: Session, subscription_id: int, cycle: int,
                            except_key: str) -> int:
    """Refunds of a cycle sent (or being sent) and not yet in the ledger: a new refund must
    leave room for them, whatever they turn out to be."""
    rows = session.exec(select(CarrierOperation).where(
        CarrierOperation.subscription_id == subscription_id, CarrierOperation.cycle == cycle,
        CarrierOperation.kind == LedgerKind.REFUND,
        CarrierOperation.idempotency_key != except_key,
        col(CarrierOperation.state).in_([OperationState.SENDING, OperationState.PENDING,
                                         OperationState.RETRYABLE,
                                         OperationState.UNSETTLED]))).all()
    return sum(row.amount_minor for row in rows)
