"""Builds the documents indexed into ``cb-interactions-YYYY.MM.DD`` (the contract in
docs/traceability.md). A document never holds a plain MSISDN: only its keyed hash and its
masked form; free text is passed through the redaction the transport uses.

Builders read what a row alone does not say (the subscription behind a key, the subscriber's
zone, the carrier's country) in the caller's session, so they run inside the caller's
transaction and see its unflushed rows. What never changes (an operation's subscription, cycle
and amount; a subscription's product, price point and subscriber; the subscriber's number and
zone) may be handed over first by code that has just read it (``remember_operation``,
``remember_subscription``): kept per process and per engine, a bounded number of each, and
consulted before reading."""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, select

from carriers.redaction import redact
from models.msisdn import mask_msisdn
from models.tables import (
    Carrier,
    CarrierInteraction,
    CarrierOperation,
    LedgerEntry,
    Subscriber,
    Subscription,
)

if TYPE_CHECKING:  # models.inbound_sms imports this module
    from models.inbound_sms import InboundSms, SmsNotice

INDEX_PREFIX = "cb-interactions-"
INDEX_PATTERN = "cb-interactions-*"
EVENTS = ("carrier_call", "callback", "receipt", "sms_notice", "sms_inbound", "rule_decision",
          "ledger")
_DETAIL_LIMIT = 500
# "<deployment>-<subscription token>-..." (activities.messages.key_prefix)
_KEY_TOKEN = re.compile(r"^[a-z0-9]{1,12}-([a-z0-9]{12})(?:-|$)")
_KEY_CYCLE = re.compile(r"-[cr]([0-9]+)(?:-|$)")


@dataclass(frozen=True)
class TraceDocument:
    """One document: its OpenSearch id ("<source>-<row id>"), event time and source."""

    doc_id: str
    timestamp: datetime
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def index_name(self) -> str:
        # the event's own UTC day: a re-delivery lands in the same index as the first delivery
        return index_for(self.timestamp)


def index_for(moment: datetime) -> str:
    return f"{INDEX_PREFIX}{as_utc(moment):%Y.%m.%d}"


def as_utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def hash_key() -> bytes:
    """The HMAC key of ``msisdn_hash``: ``Settings.trace_hash_key`` once it exists, otherwise
    derived from the deployment id (stable across processes, but not secret)."""
    from settings import get_settings  # settings read lazily: tests build documents without it

    settings = get_settings()
    secret = getattr(settings, "trace_hash_key", None)
    if secret is not None:
        value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret)
        return str(value).encode()
    return f"cb-trace:{settings.deployment_id}".encode()


def msisdn_hash(msisdn: str, key: bytes | None = None) -> str:
    """Joins a subscriber's documents without the number: HMAC-SHA256, hex."""
    return hmac.new(key if key is not None else hash_key(), msisdn.encode(),
                    hashlib.sha256).hexdigest()


def _detail(text: str | None) -> str | None:
    if not text:
        return None
    return redact(text)[:_DETAIL_LIMIT]


def _local_hour(moment: datetime, zone: str | None) -> int | None:
    if not zone:
        return None
    try:
        return as_utc(moment).astimezone(ZoneInfo(zone)).hour
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _carrier(session: Session, carrier_id: str) -> tuple[str | None, str | None]:
    """(country, timezone) of a carrier: reference data, read once per process."""
    cached = _CARRIERS.get(carrier_id)
    if cached is None:
        row = session.get(Carrier, carrier_id)
        if row is None:
            return None, None
        cached = _CARRIERS[carrier_id] = (row.country_code, row.timezone)
    return cached


_CARRIERS: dict[str, tuple[str, str]] = {}


@dataclass
class _Party:
    """What a document says about whose event it is."""

    msisdn: str | None = None
    timezone: str | None = None
    subscription_id: int | None = None
    product: str | None = None
    price_point: str | None = None

    def fields(self, moment: datetime) -> dict[str, Any]:
        out: dict[str, Any] = {"subscription_id": self.subscription_id, "product": self.product,
                               "price_point": self.price_point,
                               "local_hour": _local_hour(moment, self.timezone)}
        if self.msisdn:
            out["msisdn_hash"] = msisdn_hash(self.msisdn)
            out["msisdn_masked"] = mask_msisdn(self.msisdn)
        return out


def _subscription_party(session: Session, subscription: Subscription | None) -> _Party:
    if subscription is None:
        return _Party()
    subscriber = session.get(Subscriber, subscription.subscriber_id)
    return _Party(msisdn=subscriber.msisdn if subscriber else None,
                  timezone=subscriber.timezone if subscriber else None,
                  subscription_id=subscription.id, product=subscription.product_id,
                  price_point=subscription.price_point_id)


# -- immutable facts handed over by their readers ---------------------------------------------


@dataclass(frozen=True)
class _SubscriptionFacts:
    """What never changes about a subscription and its subscriber."""

    subscription_id: int
    product: str
    price_point: str
    msisdn: str
    timezone: str

    def party(self) -> _Party:
        return _Party(msisdn=self.msisdn, timezone=self.timezone,
                      subscription_id=self.subscription_id, product=self.product,
                      price_point=self.price_point)


@dataclass(frozen=True)
class _OperationFacts:
    """What never changes about an operation once reserved (its key names no other)."""

    subscription_id: int
    cycle: int
    amount_minor: int
    currency: str


class _Known:
    """Bounded most-recently-used maps of one engine's immutable facts (threads share them:
    activities build documents in worker threads)."""

    LIMIT = 8192

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: OrderedDict[int, _SubscriptionFacts] = OrderedDict()
        self._operations: OrderedDict[str, _OperationFacts] = OrderedDict()

    @staticmethod
    def _put(store: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
        store[key] = value
        store.move_to_end(key)
        while len(store) > limit:
            store.popitem(last=False)

    @staticmethod
    def _get(store: OrderedDict[Any, Any], key: Any) -> Any:
        value = store.get(key)
        if value is not None:
            store.move_to_end(key)
        return value

    def subscription(self, subscription_id: int) -> _SubscriptionFacts | None:
        with self._lock:
            found: _SubscriptionFacts | None = self._get(self._subscriptions, subscription_id)
            return found

    def operation(self, key: str) -> _OperationFacts | None:
        with self._lock:
            found: _OperationFacts | None = self._get(self._operations, key)
            return found

    def add_subscription(self, facts: _SubscriptionFacts) -> None:
        with self._lock:
            self._put(self._subscriptions, facts.subscription_id, facts, self.LIMIT)

    def add_operation(self, key: str, facts: _OperationFacts) -> None:
        with self._lock:
            self._put(self._operations, key, facts, self.LIMIT)


# per engine: ids are a database's own (tests open several databases in one process)
_KNOWN: weakref.WeakKeyDictionary[Engine, _Known] = weakref.WeakKeyDictionary()
_KNOWN_LOCK = threading.Lock()


def _known(session: Session) -> _Known:
    bind = session.get_bind()
    engine = bind.engine if isinstance(bind, Connection) else bind
    with _KNOWN_LOCK:
        known = _KNOWN.get(engine)
        if known is None:
            known = _KNOWN[engine] = _Known()
        return known


def remember_subscription(session: Session, subscription: Subscription,
                          subscriber: Subscriber) -> None:
    """Keeps what documents say about ``subscription`` (committed rows just read in
    ``session``), so documents built later in this process need not read them again."""
    if subscription.id is None or subscriber.id != subscription.subscriber_id:
        return
    _known(session).add_subscription(_SubscriptionFacts(
        subscription.id, subscription.product_id, subscription.price_point_id,
        subscriber.msisdn, subscriber.timezone))


def remember_operation(session: Session, operation: CarrierOperation) -> None:
    """Keeps what documents say about a committed operation (its subscription, cycle and
    amount: fixed when it was reserved), under its idempotency key."""
    _known(session).add_operation(operation.idempotency_key, _OperationFacts(
        operation.subscription_id, operation.cycle, operation.amount_minor, operation.currency))


def _party_of(session: Session, subscription_id: int) -> _Party:
    facts = _known(session).subscription(subscription_id)
    if facts is not None:
        return facts.party()
    return _subscription_party(session, session.get(Subscription, subscription_id))


def _subscription_of_key(session: Session, key: str) -> Subscription | None:
    match = _KEY_TOKEN.match(key)
    if match is None:
        return None
    return session.exec(select(Subscription).where(
        Subscription.key_token == match.group(1))).first()


def _msisdn_party(session: Session, msisdn: str, key: str = "") -> _Party:
    subscription = _subscription_of_key(session, key) if key else None
    if subscription is not None:
        party = _subscription_party(session, subscription)
        if party.msisdn == msisdn:
            return party
    subscriber = session.exec(select(Subscriber).where(Subscriber.msisdn == msisdn)).first()
    return _Party(msisdn=msisdn, timezone=subscriber.timezone if subscriber else None)


def _cycle_of_key(key: str) -> int | None:
    match = _KEY_CYCLE.search(key)
    return int(match.group(1)) if match else None


def _compose(doc_id: str, moment: datetime, event: str, carrier_id: str | None,
             session: Session, party: _Party, **facts: Any) -> TraceDocument:
    country, carrier_zone = _carrier(session, carrier_id) if carrier_id else (None, None)
    if party.timezone is None:  # no subscriber known: the carrier's zone is the next best
        party.timezone = carrier_zone
    body: dict[str, Any] = {"@timestamp": as_utc(moment).isoformat(), "event": event,
                            "carrier": carrier_id, "country": country, "partial": False}
    body.update(party.fields(moment))
    body.update(facts)
    return TraceDocument(doc_id, as_utc(moment),
                         {name: value for name, value in body.items() if value is not None})


def _operation_of_key(session: Session, key: str) -> _OperationFacts | None:
    if not key:
        return None
    facts = _known(session).operation(key)
    if facts is not None:
        return facts
    operation = session.exec(select(CarrierOperation).where(
        CarrierOperation.idempotency_key == key)).first()
    if operation is None:
        return None
    return _OperationFacts(operation.subscription_id, operation.cycle, operation.amount_minor,
                           operation.currency)


def interaction_document(session: Session, row: CarrierInteraction) -> TraceDocument:
    """A carrier call, a callback or a receipt (``operation`` says which)."""
    assert row.id is not None, "flush the interaction first: its id is the document's"
    event = row.operation if row.operation in ("callback", "receipt") else "carrier_call"
    operation = _operation_of_key(session, row.idempotency_key)
    party = (_party_of(session, operation.subscription_id) if operation
             else _subscription_party(session, _subscription_of_key(session, row.idempotency_key)))
    cycle = operation.cycle if operation else _cycle_of_key(row.idempotency_key)
    return _compose(
        f"interaction-{row.id}", row.created_at, event, row.carrier_id, session, party,
        operation=row.operation, outcome=row.outcome, idempotency_key=row.idempotency_key or None,
        cycle=cycle, latency_ms=row.latency_ms, http_status=row.status_code,
        amount_minor=operation.amount_minor if operation else None,
        currency=operation.currency if operation else None,
        detail=_detail(row.error or row.response_body or row.request_body))


def ledger_document(session: Session, entry: LedgerEntry) -> TraceDocument:
    assert entry.id is not None, "flush the entry first: its id is the document's"
    partial = entry.list_price_minor is not None and entry.amount_minor < entry.list_price_minor
    detail = f"{entry.kind} ref {entry.carrier_reference}"
    if partial:
        detail += f" (partial: {entry.amount_minor} of {entry.list_price_minor})"
    return _compose(
        f"ledger-{entry.id}", entry.committed_at, "ledger", entry.carrier_id, session,
        _party_of(session, entry.subscription_id), operation=str(entry.kind),
        outcome="committed", idempotency_key=entry.idempotency_key,
        cycle=entry.cycle, amount_minor=entry.amount_minor, currency=entry.currency,
        partial=partial, detail=_detail(detail))


def notice_document(session: Session, row: SmsNotice) -> TraceDocument:
    """One send of a free notice: a notice sent again after a refusal is a second document."""
    assert row.id is not None
    return _compose(
        f"sms_notice-{row.id}-{row.sends}", row.updated_at, "sms_notice", row.carrier_id, session,
        _msisdn_party(session, row.msisdn, row.idempotency_key),
        operation=row.kind, outcome=row.state, idempotency_key=row.idempotency_key,
        cycle=_cycle_of_key(row.idempotency_key), detail=_detail(row.outcome))


def inbound_document(session: Session, row: InboundSms) -> TraceDocument:
    """A text from a subscriber; written when stored and again (same id, same index: the
    event time stays the reception) once acted on."""
    assert row.id is not None
    what = f"{row.short_code}: {row.text}"
    if row.outcome:
        what += f" -> {row.outcome}"
    return _compose(
        f"sms_inbound-{row.id}", row.received_at, "sms_inbound", row.carrier_id, session,
        _msisdn_party(session, row.msisdn), operation=row.action or "received",
        outcome=row.state, detail=_detail(what))


def rule_decision_document(
    session: Session, *, idempotency_key: str, carrier_id: str, subscription_id: int, rule: str,
    outcome: str, at: datetime, cycle: int | None = None, amount_minor: int | None = None,
    currency: str | None = None, detail: str | None = None, operation: str = "charge",
) -> TraceDocument:
    """A billing rule's decision about an operation (e.g. outcome "refused", rule "per_day").
    The operation's idempotency key is the source row: an activity retried decides again under
    the same id and overwrites, never duplicates. ``at``: a fixed instant of the operation
    (its due time), so a retry lands in the same daily index."""
    return _compose(
        f"rule_decision-{idempotency_key}", at, "rule_decision", carrier_id, session,
        _party_of(session, subscription_id), operation=operation, outcome=outcome, rule=rule,
        idempotency_key=idempotency_key,
        cycle=cycle if cycle is not None else _cycle_of_key(idempotency_key),
        amount_minor=amount_minor, currency=currency, detail=_detail(detail))
