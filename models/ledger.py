"""Ledger writes and reads. Entries are only ever inserted; an idempotency key is written once."""

from __future__ import annotations

import re

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from models.db import insert_row
from models.tables import LedgerEntry, LedgerKind
from traceability.documents import ledger_document
from traceability.outbox import enqueue


class LedgerConflict(RuntimeError):
    """The key is already in the ledger with different facts: never overwrite money."""


def find_by_key(session: Session, idempotency_key: str) -> LedgerEntry | None:
    return session.exec(
        select(LedgerEntry).where(LedgerEntry.idempotency_key == idempotency_key)
    ).first()


def append(session: Session, entry: LedgerEntry, *, commit: bool = True) -> LedgerEntry:
    """Inserts ``entry``; a repeat of the same key returns the entry already written. The
    entry's traceability document commits with it; a repeat writes none.

    ``commit=False``: the entry and its document are only flushed into the session's
    transaction, for the caller to commit with what must be written with them (append first:
    a repeated key, found at the flush, rolls the whole transaction back, as it does here,
    and the entry already written is returned)."""
    try:
        insert_row(session, entry)  # a repeated key fails here, before any document is queued
        enqueue(session, ledger_document(session, entry))
        if commit:
            session.commit()
    except IntegrityError:
        session.rollback()
        existing = find_by_key(session, entry.idempotency_key)
        if existing is None:
            raise
        if (existing.amount_minor, existing.currency, existing.kind) != (
            entry.amount_minor, entry.currency, entry.kind
        ):
            raise LedgerConflict(
                f"ledger key {entry.idempotency_key} already holds "
                f"{existing.kind} {existing.amount_minor} {existing.currency}"
            ) from None
        return existing
    return entry


# money taken from the subscriber: a charge, or one reconciliation found in the carrier's report
TAKEN = (LedgerKind.CHARGE, LedgerKind.RECONCILED)


def charge_for_cycle(session: Session, subscription_id: int, cycle: int) -> LedgerEntry | None:
    return session.exec(
        select(LedgerEntry).where(
            LedgerEntry.subscription_id == subscription_id,
            LedgerEntry.cycle == cycle,
            col(LedgerEntry.kind).in_(TAKEN),
        ).order_by(col(LedgerEntry.id))
    ).first()


def refund_of(session: Session, charge: LedgerEntry) -> LedgerEntry | None:
    return session.exec(
        select(LedgerEntry).where(
            LedgerEntry.refunds_entry_id == charge.id, LedgerEntry.kind == LedgerKind.REFUND
        )
    ).first()


# a refund of a charge other than its cycle's first refund: "<charge key>-r<n>"
_REFUND_OF_CHARGE = re.compile(r"^(?P<charge>.+-c[0-9]+-a[0-9]+)-r[0-9]+$")


def refund_key_of_charge(charge_key: str, ordinal: int) -> str:
    """The key of a charge's ``ordinal``-th refund (the cycle's first refund of its first
    charge keeps the older ``<prefix>-r<cycle>``)."""
    return f"{charge_key}-r{ordinal}"


def charge_refunded_by(session: Session, refund_key: str, subscription_id: int,
                       cycle: int) -> LedgerEntry | None:
    """The charge a refund key refunds: the one it names, else its cycle's first charge."""
    named = _REFUND_OF_CHARGE.match(refund_key)
    if named is not None:
        charge = find_by_key(session, named["charge"])
        if charge is None or charge.kind not in TAKEN or (
                charge.subscription_id, charge.cycle) != (subscription_id, cycle):
            return None
        return charge
    return charge_for_cycle(session, subscription_id, cycle)


def refunded_minor(session: Session, charge: LedgerEntry) -> int:
    """What the ledger holds as refunded of ``charge``."""
    return sum(entry.amount_minor for entry in session.exec(
        select(LedgerEntry).where(LedgerEntry.refunds_entry_id == charge.id,
                                  LedgerEntry.kind == LedgerKind.REFUND)))
