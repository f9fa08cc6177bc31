"""Notices: the free SMS a subscriber must get (welcome, receipt, reminders, opt-in PIN, HELP,
STOP confirmation, refusal), rendered in the subscriber's language and sent at most once per
idempotency key.

A notice goes through the carrier's own SMSC when the carrier speaks SMPP, from the short code
of the subscription (as free-to-end-user: the SMSC never bills it); otherwise through the
platform's notice channel (an SMPP carrier named for it), if one is configured. It is recorded
before it is sent (``SmsNotice``): a notice is not money, so one the SMSC refused is sent again
on the activity's retry, and one whose fate is unknown is never sent twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError

from carriers.base import CarrierAdapter, OperationResult, Outcome
from carriers.loader import Registry
from carriers.sms_text import NOTICE_KINDS, UnknownNotice, notice_text, sms_encoding
from keywords.routes import KeywordRoutes, default_routes
from models.db import in_db_thread
from models.inbound_sms import SmsNotice, reserve_notice, settle_notice
from models.money import format_major
from models.tables import PricePoint, Product, Subscriber, Subscription

log = logging.getLogger(__name__)

# the sender id of platform notices when the carrier has no short code of ours
PLATFORM_SOURCE = "GAMES"


@dataclass
class NoticeInput:
    subscription_id: int | None
    subscriber_id: int
    carrier_id: str
    # welcome | receipt | renewal_reminder | monthly_reminder | opt_in_pin | help |
    # stop_confirmation | refused (and already_subscribed, a keyword answer)
    kind: str
    # empty: the subscriber's own
    locale: str
    # values of the template (product, price, short_code, support, pin, date); what is not
    # given is taken from the subscription and keywords/routes.toml
    params: dict[str, str] = field(default_factory=dict)
    idempotency_key: str = ""


@dataclass
class NoticeOutput:
    # sent | unknown (may have been sent: never sent again) | rejected | no_channel
    outcome: str
    idempotency_key: str
    # whether this call sent it (False: an earlier call did, or nobody may)
    sent_now: bool = False
    text: str = ""
    message: str = ""


class SmsChannel(Protocol):
    async def send_sms(self, key: str, msisdn: str, text: str, source: str) -> OperationResult: ...


class AdapterSource(Protocol):
    """What the notices need of carriers.pool.AdapterPool."""

    def get(self, carrier_id: str) -> CarrierAdapter: ...


class NoticeSender:
    """Sends one free SMS under an idempotency key, recorded first; shared by the notice
    activity and the keyword answers (keywords/handler.py)."""

    def __init__(self, engine: Engine, adapters: AdapterSource, registry: Registry,
                 platform_carrier_id: str | None = None) -> None:
        self._engine = engine
        self._adapters = adapters
        self._registry = registry
        self._platform = platform_carrier_id

    def channel(self, carrier_id: str, source: str | None) -> tuple[SmsChannel, str] | None:
        """The carrier's own SMSC (from ``source`` or its first short code), else the platform's."""
        carrier = self._registry.carriers.get(carrier_id)
        if carrier is not None and carrier.protocol == "smpp":
            adapter = self._adapters.get(carrier_id)
            code = source or next((p.short_code for p in carrier.price_points if p.short_code), None)
            if code and hasattr(adapter, "send_sms"):
                return adapter, code
        if self._platform is not None:
            platform = self._adapters.get(self._platform)
            if hasattr(platform, "send_sms"):
                return platform, PLATFORM_SOURCE
        return None

    async def send(self, key: str, carrier_id: str, msisdn: str, kind: str, locale: str,
                   text: str, source: str | None = None) -> NoticeOutput:
        found = self.channel(carrier_id, source)
        if found is None:
            log.warning("%s notice for %s not sent: no SMS channel for the carrier", kind,
                        carrier_id)
            return NoticeOutput("no_channel", key, text=text, message="no SMS channel")
        if sms_encoding(text).segments > 1:
            # our templates are checked to fit; a value that overflows one is our mistake
            raise ApplicationError(f"{kind} notice needs {sms_encoding(text).segments} segments",
                                   type="NoticeTooLong", non_retryable=True)
        channel, sender = found
        row, may_send = await in_db_thread(self._engine, self._reserve, key, carrier_id,
                                           msisdn, kind, locale)
        if not may_send:
            return NoticeOutput(row.state if row.state != "sending" else "unknown", key,
                                text=text, message="already sent under this key")
        result = await channel.send_sms(key, msisdn, text, sender)
        state, outcome = _settled(result)
        await in_db_thread(self._engine, self._settle, key, state, result)
        if state == "refused" and result.outcome is Outcome.TRANSIENT:
            # the SMSC did not take it: the activity's retry sends it again
            raise ApplicationError(f"notice refused for now: {result.carrier_code}",
                                   type="NoticeNotTaken")
        return NoticeOutput(outcome, key, sent_now=state == "sent", text=text,
                            message=result.carrier_code or result.message)

    def _reserve(self, key: str, carrier_id: str, msisdn: str, kind: str,
                 locale: str) -> tuple[SmsNotice, bool]:
        with Session(self._engine, expire_on_commit=False) as session:
            return reserve_notice(session, key, carrier_id, msisdn, kind, locale)

    def _settle(self, key: str, state: str, result: OperationResult) -> None:
        with Session(self._engine) as session:
            settle_notice(session, key, state, f"{result.outcome.value}:{result.carrier_code or ''}")


def _settled(result: OperationResult) -> tuple[str, str]:
    """(row state, outcome) of a send: only a refusal may be sent again."""
    if result.outcome is Outcome.SUCCEEDED:
        return "sent", "sent"
    if result.outcome in (Outcome.TRANSIENT, Outcome.REJECTED):
        return "refused", "rejected"
    return "unknown", "unknown"


@dataclass(frozen=True)
class _Subscriber:
    msisdn: str
    locale: str
    defaults: dict[str, str]


class NoticeActivities:
    def __init__(self, engine: Engine, adapters: AdapterSource, registry: Registry,
                 platform_carrier_id: str | None = None,
                 routes: KeywordRoutes | None = None) -> None:
        self._engine = engine
        self._registry = registry
        self._routes = routes or default_routes()
        self.sender = NoticeSender(engine, adapters, registry, platform_carrier_id)

    def _subscriber(self, notice: NoticeInput) -> _Subscriber:
        """The number, locale and the template values the subscription gives."""
        with Session(self._engine) as session:
            subscriber = session.get(Subscriber, notice.subscriber_id)
            if subscriber is None:
                raise ApplicationError(f"no subscriber {notice.subscriber_id}",
                                       type="ConfigurationError", non_retryable=True)
            # a receipt says when: the day it is sent, unless the workflow names one
            defaults: dict[str, str] = {"support": self._routes.default_support,
                                        "date": datetime.now(UTC).date().isoformat()}
            if self._routes.default_short_code:
                defaults["short_code"] = self._routes.default_short_code
            subscription = (session.get(Subscription, notice.subscription_id)
                            if notice.subscription_id is not None else None)
            price = session.get(PricePoint, subscription.price_point_id) if subscription else None
            if price is not None:
                product = session.get(Product, price.product_id)
                defaults["product"] = product.name if product else price.product_id
                defaults["price"] = f"{format_major(price.amount_minor, price.currency)} " \
                                    f"{price.currency}"
                route = self._routes.for_price_point(price.id)
                if route is not None:
                    defaults.update(short_code=route.short_code, product=route.service,
                                    support=route.support)
            return _Subscriber(subscriber.msisdn, subscriber.locale, defaults)

    @activity.defn(name="send_notice")
    async def send_notice(self, notice: NoticeInput) -> NoticeOutput:
        if notice.kind not in NOTICE_KINDS or not notice.idempotency_key:
            raise ApplicationError(f"bad notice: kind {notice.kind!r}, key "
                                   f"{notice.idempotency_key!r}", type="ConfigurationError",
                                   non_retryable=True)
        who = await in_db_thread(self._engine, self._subscriber, notice)
        locale = notice.locale or who.locale
        try:
            text = notice_text(notice.kind, locale, **(who.defaults | notice.params))
        except UnknownNotice as exc:
            raise ApplicationError(str(exc), type="ConfigurationError", non_retryable=True) from None
        source = (who.defaults.get("short_code")
                  if self._registry.carriers.get(notice.carrier_id) is not None else None)
        return await self.sender.send(notice.idempotency_key, notice.carrier_id, who.msisdn,
                                      notice.kind, locale, text, source)
