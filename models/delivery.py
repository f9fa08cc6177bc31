"""What we asked the game backend to grant for a payment, recorded before the request leaves."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

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
