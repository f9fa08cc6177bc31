"""Database tables. Amounts are integer minor units; MSISDNs are E.164 strings."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


_TOKEN_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def new_key_token() -> str:
    """12 random characters (60 bits) from an alphabet that survives every carrier's key rules."""
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(12))


class Period(StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    ONE_OFF = "one_off"
    # fixed number of seconds between charges: demo and benchmark plans
    INTERVAL = "interval"


class SubscriptionStatus(StrEnum):
    PENDING_OPT_IN = "pending_opt_in"  # waits for the subscriber's consent: nothing charged
    ACTIVE = "active"
    PAST_DUE = "past_due"
    PAUSED = "paused"
    SUSPENDED = "suspended"  # the retry rule gave up: no charge until resumed
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    OPT_IN_EXPIRED = "opt_in_expired"  # consent never came: nothing was ever charged


LIVE_SUBSCRIPTION_STATUSES = (SubscriptionStatus.PENDING_OPT_IN, SubscriptionStatus.ACTIVE,
                              SubscriptionStatus.PAST_DUE, SubscriptionStatus.PAUSED,
                              SubscriptionStatus.SUSPENDED)
LIVE_STATUSES_SQL = "status IN ({})".format(
    ", ".join(f"'{status.value}'" for status in LIVE_SUBSCRIPTION_STATUSES))


class LedgerKind(StrEnum):
    CHARGE = "charge"
    REFUND = "refund"
    RECONCILED = "reconciled"


class Country(SQLModel, table=True):
    code: str = Field(primary_key=True, max_length=2)
    name: str
    currency: str = Field(max_length=3)
    timezones: str = Field(description="comma-separated IANA zones, the first is the default")
    default_locale: str


class Carrier(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str
    country_code: str = Field(foreign_key="country.code", index=True)
    protocol: str
    base_url: str
    auth_kind: str
    currency: str = Field(max_length=3)
    timezone: str


class Subscriber(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    msisdn: str = Field(unique=True, index=True, max_length=16)
    carrier_id: str = Field(foreign_key="carrier.id", index=True)
    timezone: str
    locale: str
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))


class Product(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str


class ProductVariant(SQLModel, table=True):
    """One deliverable form of a product: an edition of its content for a country, a locale and
    a price point. A missing country, locale or price point means "any": the catalogue's
    fallbacks (``catalogue.select_variant``) pick among them."""

    __table_args__ = (
        sa.Index("ix_productvariant_selection", "product_id", "edition", "country_code"),
    )

    id: str = Field(primary_key=True)
    product_id: str = Field(foreign_key="product.id", index=True)
    name: str
    # what the game backend is asked to grant: unique across the catalogue
    sku: str = Field(unique=True)
    edition: str = Field(max_length=32)
    country_code: str | None = Field(default=None, foreign_key="country.code", max_length=2)
    locale: str | None = Field(default=None, max_length=16)
    price_point_id: str | None = Field(default=None, foreign_key="pricepoint.id")
    # units granted (gems); None: access for a time (the period paid for)
    quantity: int | None = None
    # the product's last resort: its default edition, for any country, locale and price point
    is_default: bool = False


class PricePoint(SQLModel, table=True):
    __table_args__ = (
        sa.CheckConstraint("amount_minor > 0", name="price_point_amount_positive"),
        sa.UniqueConstraint("product_id", "carrier_id", "period", "amount_minor", "currency"),
    )

    id: str = Field(primary_key=True)
    product_id: str = Field(foreign_key="product.id", index=True)
    carrier_id: str = Field(foreign_key="carrier.id", index=True)
    amount_minor: int
    currency: str = Field(max_length=3)
    period: Period = Field(sa_type=sa.String(16))
    interval_seconds: int | None = None
    # delays, in seconds, of the retries after insufficient funds, each counted from the
    # previous failed attempt
    retry_schedule_seconds: str = Field(default="3600,21600,86400")

    def retry_delays(self) -> list[int]:
        return [int(s) for s in self.retry_schedule_seconds.split(",") if s.strip()]


class Subscription(SQLModel, table=True):
    __table_args__ = (
        # a subscriber holds at most one live subscription per product
        sa.Index(
            "one_live_subscription_per_product",
            "subscriber_id",
            "product_id",
            unique=True,
            sqlite_where=sa.text(LIVE_STATUSES_SQL),
            postgresql_where=sa.text(LIVE_STATUSES_SQL),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    # random, never reused: with the deployment's prefix it makes our idempotency keys unique
    # across databases, restores and environments sharing a merchant account
    key_token: str = Field(default_factory=new_key_token, unique=True, index=True, max_length=16)
    subscriber_id: int = Field(foreign_key="subscriber.id", index=True)
    product_id: str = Field(foreign_key="product.id")
    price_point_id: str = Field(foreign_key="pricepoint.id")
    status: SubscriptionStatus = Field(sa_type=sa.String(16), default=SubscriptionStatus.ACTIVE)
    started_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
    ended_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))

    @property
    def workflow_id(self) -> str:
        return f"subscription-{self.id}"


class LedgerEntry(SQLModel, table=True):
    """Append-only: the database refuses UPDATE and DELETE (see the migration's triggers)."""

    __table_args__ = (
        sa.CheckConstraint("amount_minor > 0", name="ledger_amount_positive"),
    )

    id: int | None = Field(default=None, primary_key=True)
    idempotency_key: str = Field(unique=True, max_length=128)
    kind: LedgerKind = Field(sa_type=sa.String(16))
    subscription_id: int = Field(foreign_key="subscription.id", index=True)
    cycle: int
    carrier_id: str = Field(foreign_key="carrier.id", index=True)
    amount_minor: int
    currency: str = Field(max_length=3)
    carrier_reference: str
    # the charge a refund reverses
    refunds_entry_id: int | None = Field(default=None, foreign_key="ledgerentry.id")
    # a charge's full price for its cycle: less charged is a partial payment (None: the
    # entry's amount is the price, as before partial payments existed)
    list_price_minor: int | None = None
    due_at: datetime = Field(sa_type=sa.DateTime(timezone=True))
    committed_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))


class OperationState(StrEnum):
    # reserved before the request leaves: from here on the carrier may have acted
    SENDING = "sending"
    # the carrier answered that nothing was done (busy, credentials refused): may send again
    RETRYABLE = "retryable"
    # the carrier may have acted and has not given a final answer yet
    PENDING = "pending"
    # the final answer is known (``outcome``)
    SETTLED = "settled"
    # no final answer within the settlement bounds: may have debited; a late result or
    # reconciliation settles it
    UNSETTLED = "unsettled"


class CarrierOperation(SQLModel, table=True):
    """Every charge and refund we send, from before it leaves until its final answer: what makes
    a second send impossible without a look-up, where results pushed by carriers are kept
    durably, and where an operator finds what stays unsettled."""

    id: int | None = Field(default=None, primary_key=True)
    idempotency_key: str = Field(unique=True, max_length=128)
    kind: LedgerKind = Field(sa_type=sa.String(8))
    carrier_id: str = Field(index=True)
    # the workflow that owns the operation: where pushed results are relayed
    workflow_id: str
    subscription_id: int = Field(index=True)
    cycle: int
    amount_minor: int
    currency: str = Field(max_length=3)
    due_at: datetime = Field(sa_type=sa.DateTime(timezone=True))
    state: OperationState = Field(sa_type=sa.String(16), index=True)
    # how many times the request itself was sent (a resend only after a "not found")
    sends: int = 0
    # when it was last sent (a "not found" soon after means nothing)
    last_sent_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    # the carrier answered in a way that shows it may have acted (pending, unknown): from then
    # on the operation is only ever settled, and "the carrier did nothing" is never believed
    ambiguous: bool = False
    outcome: str | None = None
    carrier_reference: str | None = None
    carrier_code: str | None = None
    message: str = ""
    # the latest result the carrier pushed (callback, receipt), verified and bound to carrier_id
    reported_outcome: str | None = None
    reported_reference: str | None = None
    reported_code: str | None = None
    reported_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    unsettled_reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))


class CarrierInteraction(SQLModel, table=True):
    """One request/response exchange with a carrier, with secrets removed and MSISDNs masked."""

    id: int | None = Field(default=None, primary_key=True)
    carrier_id: str = Field(index=True)
    operation: str
    idempotency_key: str = Field(index=True, max_length=128)
    method: str
    url: str
    request_body: str
    status_code: int | None = None
    response_body: str
    outcome: str
    error: str | None = None
    latency_ms: int
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))


class SmppSubmission(SQLModel, table=True):
    """A premium SMS sent for an operation, so its delivery receipt can be matched to the
    operation however late it arrives, across restarts. SMPP has no idempotency key: this row
    is what stops a second submit_sm for the same key."""

    __table_args__ = (sa.UniqueConstraint("carrier_id", "idempotency_key"),)

    id: int | None = Field(default=None, primary_key=True)
    carrier_id: str = Field(index=True)
    idempotency_key: str = Field(max_length=128)
    msisdn: str = Field(max_length=16)
    # sending -> submitted (message id known) -> delivered | failed; refused: not accepted
    state: str = Field(max_length=16)
    message_id: str | None = Field(default=None, index=True, max_length=65)
    receipt_status: str | None = None
    error_code: str | None = None
    updated_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))

    @property
    def user_reference(self) -> int:
        """What goes in user_message_reference (16 bits) so receipts can be matched even when
        the submit_sm_resp with the message id was lost."""
        assert self.id is not None
        return self.id % 65536
