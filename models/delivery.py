"""What we asked the game backend to grant for a payment, recorded before the request leaves."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, select

from models.tables import utcnow


class DeliveryState(StrEnum):
    # recorded before the grant request leaves: from here on the backend may have granted
    SENDING = "sending"
    # the backend holds the entitlement (``entitlement_id``)
    DELIVERED = "delivered"
    # the backend refused for good (``reason``): nothing was granted
    REFUSED = "refused"
    # taken back after a refund, or cancelled before the backend ever granted it
    REVOKED = "revoked"


class Delivery(SQLModel, table=True):
    """One grant per paid charge. The request (sku, quantity or until) is fixed here at the first
    attempt, so every retry sends the same body under the same grant id and the backend can
    recognise it."""

    id: int | None = Field(default=None, primary_key=True)
    # the charge's idempotency key + "-d": the backend's grant id
    grant_id: str = Field(unique=True, max_length=128)
    subscription_id: int = Field(index=True)
    subscriber_id: int
    cycle: int
    product_id: str
    variant_id: str = Field(foreign_key="productvariant.id")
    sku: str
    quantity: int | None = None
    until: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    paid_minor: int
    currency: str = Field(max_length=3)
    state: DeliveryState = Field(sa_type=sa.String(16), index=True)
    # how many times the grant request was sent
    sends: int = 0
    entitlement_id: str | None = None
    reason: str | None = None
    revoke_reason: str | None = None
    revoked_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))


class DeliveryConflict(RuntimeError):
    """A grant id reused for another delivery: our mistake, never the subscriber's."""


def find(session: Session, grant_id: str) -> Delivery | None:
    return session.exec(select(Delivery).where(Delivery.grant_id == grant_id)).first()


def transition(session: Session, grant_id: str, to: DeliveryState,
               allowed_from: tuple[DeliveryState, ...], **facts: object) -> Delivery:
    """Moves the row to ``to`` only from ``allowed_from`` (in one locked read-modify-write);
    returns the row as it stands either way, so a concurrent attempt's outcome is seen."""
    row = session.exec(select(Delivery).where(Delivery.grant_id == grant_id)
                       .with_for_update()).first()
    if row is None:
        raise DeliveryConflict(f"no delivery recorded for grant {grant_id}")
    if row.state in allowed_from:
        row.state = to
        for name, value in facts.items():
            setattr(row, name, value)
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
        session.refresh(row)
    return row


def count_send(session: Session, grant_id: str) -> bool:
    """Notes, before it leaves, that a grant request is sent; False if the row left ``sending``
    meanwhile (a concurrent attempt concluded it, or it was revoked): then nothing is sent."""
    row = session.exec(select(Delivery).where(Delivery.grant_id == grant_id)
                       .with_for_update()).first()
    if row is None or row.state != DeliveryState.SENDING:
        return False
    row.sends += 1
    row.updated_at = utcnow()
    session.add(row)
    session.commit()
    return True
