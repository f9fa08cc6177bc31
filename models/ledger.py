"""Ledger writes and reads. Entries are only ever inserted; an idempotency key is written once."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from models.tables import LedgerEntry, LedgerKind
from traceability.documents import ledger_document
from traceability.outbox import enqueue


class LedgerConflict(RuntimeError):
    """The key is already in the ledger with different facts: never overwrite money."""


def find_by_key(session: Session, idempotency_key: str) -> LedgerEntry | None:
    return session.exec(
        select(LedgerEntry).where(LedgerEntry.idempotency_key == idempotency_key)
    ).first()


def append(session: Session, entry: LedgerEntry) -> LedgerEntry:
    """Inserts ``entry``; a repeat of the same key returns the entry already written. The
    entry's traceability document commits with it; a repeat writes none."""
    session.add(entry)
    try:
        session.flush()  # a repeated key fails here, before any document is queued
        enqueue(session, ledger_document(session, entry))
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
    session.refresh(entry)
    return entry


def charge_for_cycle(session: Session, subscription_id: int, cycle: int) -> LedgerEntry | None:
    return session.exec(
        select(LedgerEntry).where(
            LedgerEntry.subscription_id == subscription_id,
            LedgerEntry.cycle == cycle,
            LedgerEntry.kind == LedgerKind.CHARGE,
        )
    ).first()


def refund_of(session: Session, charge: LedgerEntry) -> LedgerEntry | None:
    return session.exec(
        select(LedgerEntry).where(
            LedgerEntry.refunds_entry_id == charge.id, LedgerEntry.kind == LedgerKind.REFUND
        )
    ).first()
