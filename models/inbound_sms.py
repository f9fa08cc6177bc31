"""SMS exchanged with subscribers outside charges: texts they send to our short codes
(``InboundSms``, mobile-originated) and the free notices we send them (``SmsNotice``).

An inbound row is written before the SMSC's deliver_sm is acknowledged, under a unique
(carrier, dedup key): a redelivered message finds its row and acts once. The key is the
SMSC's own id of the message when it gives one; otherwise a hash of number, short code, text
and UTC day (the same text twice in a day is one request: every action is idempotent anyway).

A notice row is written before its submit_sm leaves, under its idempotency key: a key is sent
at most once; only a notice the SMSC said it did not take may be sent again.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, select

from models.tables import utcnow
from traceability.documents import inbound_document, notice_document
from traceability.outbox import enqueue

# inbound: received (stored, not yet acted on) -> handled | ignored | failed (set aside)
INBOUND_OPEN = "received"
# notice: sending -> sent | unknown (never sent again) ; sending -> refused -> sending
NOTICE_MAY_SEND = ("refused",)


class InboundSms(SQLModel, table=True):
    __tablename__ = "inbound_sms"
    __table_args__ = (sa.UniqueConstraint("carrier_id", "dedup_key"),)

    id: int | None = Field(default=None, primary_key=True)
    carrier_id: str = Field(index=True)
    dedup_key: str = Field(max_length=80)
    smsc_message_id: str | None = None
    msisdn: str = Field(index=True, max_length=16)
    short_code: str = Field(max_length=16)
    text: str
    state: str = Field(default=INBOUND_OPEN, max_length=16, index=True)
    action: str | None = Field(default=None, max_length=16)
    # what was done: "started subscription-12", "cancelled 2", "no subscription", ...
    outcome: str | None = None
    received_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
    handled_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class SmsNotice(SQLModel, table=True):
    __tablename__ = "sms_notice"

    id: int | None = Field(default=None, primary_key=True)
    idempotency_key: str = Field(unique=True, max_length=128)
    carrier_id: str = Field(index=True)
    msisdn: str = Field(max_length=16)
    kind: str = Field(max_length=24)
    locale: str = Field(max_length=16)
    state: str = Field(default="sending", max_length=16)
    sends: int = 0
    outcome: str | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))


def dedup_key(smsc_message_id: str | None, msisdn: str, short_code: str, text: str,
              at: datetime) -> str:
    if smsc_message_id:
        return f"id:{smsc_message_id}"[:80]
    material = "\x1f".join((msisdn, short_code, text, at.date().isoformat()))
    return "sha256:" + hashlib.sha256(material.encode("utf-8")).hexdigest()


def store_inbound(session: Session, row: InboundSms) -> InboundSms:
    """Inserts the row, or returns the one already stored under its key (a redelivery)."""
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
            enqueue(session, inbound_document(session, row))
        session.commit()
        session.refresh(row)
        return row
    except IntegrityError:
        session.rollback()
        found = session.exec(select(InboundSms).where(
            InboundSms.carrier_id == row.carrier_id,
            InboundSms.dedup_key == row.dedup_key)).one()
        return found


def finish_inbound(session: Session, row_id: int, state: str, action: str, outcome: str) -> bool:
    """Marks an open row done; False when someone else already did."""
    table = InboundSms.__table__  # type: ignore[attr-defined]
    result = session.execute(sa.update(table).where(
        table.c.id == row_id, table.c.state == INBOUND_OPEN).values(
        state=state, action=action, outcome=outcome, handled_at=utcnow()))
    done = bool(result.rowcount)  # type: ignore[attr-defined]
    if done:  # the settled version of its document, in the same transaction
        row = session.get(InboundSms, row_id, populate_existing=True)
        if row is not None:
            enqueue(session, inbound_document(session, row))
    session.commit()
    return done


def open_inbound(session: Session, limit: int = 100) -> list[InboundSms]:
    """Stored and never acted on (a worker stopped in between): for a sweep at start."""
    return list(session.exec(select(InboundSms).where(InboundSms.state == INBOUND_OPEN)
                             .order_by(InboundSms.id).limit(limit)).all())  # type: ignore[arg-type]


def reserve_notice(session: Session, key: str, carrier_id: str, msisdn: str, kind: str,
                   locale: str) -> tuple[SmsNotice, bool]:
    """The notice's row and whether the caller may send it now: a new key, or one the SMSC
    refused before. The claim is one conditional UPDATE, so two callers never both send."""
    table = SmsNotice.__table__  # type: ignore[attr-defined]
    try:
        with session.begin_nested():
            session.add(SmsNotice(idempotency_key=key, carrier_id=carrier_id, msisdn=msisdn,
                                  kind=kind, locale=locale, sends=1))
        session.commit()
        may_send = True
    except IntegrityError:
        session.rollback()
        result = session.execute(sa.update(table).where(
            table.c.idempotency_key == key, table.c.state.in_(NOTICE_MAY_SEND)).values(
            state="sending", sends=table.c.sends + 1, updated_at=utcnow()))
        session.commit()
        may_send = bool(result.rowcount)  # type: ignore[attr-defined]
    row = session.exec(select(SmsNotice).where(SmsNotice.idempotency_key == key)).one()
    return row, may_send


def settle_notice(session: Session, key: str, state: str, outcome: str) -> None:
    table = SmsNotice.__table__  # type: ignore[attr-defined]
    result = session.execute(sa.update(table).where(
        table.c.idempotency_key == key, table.c.state == "sending").values(
        state=state, outcome=outcome, updated_at=utcnow()))
    if result.rowcount:  # type: ignore[attr-defined]
        # one document per send: a notice sent again after a refusal is a new event
        row = session.exec(select(SmsNotice).where(SmsNotice.idempotency_key == key)
                           .execution_options(populate_existing=True)).one()
        enqueue(session, notice_document(session, row))
    session.commit()
