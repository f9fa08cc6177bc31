"""Acts on a subscriber's text (one stored ``InboundSms`` row): subscribe, stop, help, or
confirm an opt-in with a PIN, and answers by a free SMS from the same short code.

Each row acts once (``finish_inbound`` closes it); a row left open by a worker that stopped
is acted on again, which is safe: a subscribe finds the subscription it started, a stop finds
nothing left to cancel, and every answer is keyed by the row, so it is sent at most once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from activities.notices import NoticeOutput, NoticeSender
from carriers.loader import Registry
from carriers.sms_text import notice_text
from keywords.routes import ActionKind, KeywordAction, KeywordRoutes, default_routes
from models.db import in_db_thread
from models.inbound_sms import InboundSms, finish_inbound
from models.money import format_major
from models.tables import PricePoint, Subscriber, Subscription
from starter import StartSubscriptionRequest, SubscriptionRequestError
from workflows.types import BillingState

log = logging.getLogger(__name__)

# the status of a subscription waiting for the subscriber's PIN (the workflow's own literal)
PENDING_OPT_IN = "pending_opt_in"
# what STOP ends, and what makes a second JOIN "already subscribed"
STOPPABLE = ("active", "past_due", "paused", "suspended", PENDING_OPT_IN)
CONFIRM_OPT_IN = "confirm_opt_in"


class Subscriptions(Protocol):
    """What the handler needs of starter.SubscriptionClient."""

    client: Client

    async def start_subscription(self, request: StartSubscriptionRequest) -> Any: ...

    async def cancel_subscription(self, subscription_id: int) -> BillingState: ...


def welcome_key(key_prefix: str) -> str:
    """The welcome's key, the one the subscription workflow sends it under: it goes once."""
    return f"{key_prefix}-welcome"


def reply_key(row: InboundSms) -> str:
    return f"mo-{row.carrier_id}-{row.id}-reply"


@dataclass(frozen=True)
class _Held:
    """A subscription of the texting number on the MO's carrier."""

    id: int
    price_point_id: str
    status: str


class MoHandler:
    def __init__(self, subscriptions: Subscriptions, sms_sender: NoticeSender, engine: Engine,
                 registry: Registry, routes: KeywordRoutes | None = None,
                 welcome_on_subscribe: bool = False) -> None:
        self._subscriptions = subscriptions
        # the subscription workflow sends the welcome itself (after the opt-in where there is
        # one); True only where it does not. Either way under the workflow's key: at most once
        self._welcome = welcome_on_subscribe
        self._sender = sms_sender
        self._engine = engine
        self._registry = registry
        self._routes = routes or default_routes()

    # -- reading ------------------------------------------------------------------------------

    def _held(self, msisdn: str, carrier_id: str) -> tuple[str | None, list[_Held]]:
        """The subscriber's locale (None if unknown) and their subscriptions on the carrier."""
        with Session(self._engine) as session:
            subscriber = session.exec(select(Subscriber).where(Subscriber.msisdn == msisdn)).first()
            if subscriber is None:
                return None, []
            rows = session.exec(
                select(Subscription, PricePoint)
                .join(PricePoint, col(PricePoint.id) == col(Subscription.price_point_id))
                .where(Subscription.subscriber_id == subscriber.id,
                       PricePoint.carrier_id == carrier_id)
                .order_by(col(Subscription.id))).all()
            return subscriber.locale, [_Held(s.id, p.id, str(s.status)) for s, p in rows
                                       if s.id is not None]

    # -- acting --------------------------------------------------------------------------------

    async def handle(self, row: InboundSms) -> str:
        """Acts on the row and closes it; returns what was done."""
        assert row.id is not None
        locale, held = await in_db_thread(self._engine, self._held, row.msisdn, row.carrier_id)
        action = self._routes.route(row.short_code, row.text, locale)
        if action.route is None or action.route.carrier_id != row.carrier_id:
            outcome, state = "not one of our short codes on this carrier", "ignored"
        else:
            outcome, state = await self._act(row, action, held), "handled"
        await in_db_thread(self._engine, self._finish, row.id, state, action.kind.value, outcome)
        log.info("mo %s on %s: %s -> %s", row.id, row.carrier_id, action.kind.value, outcome)
        return outcome

    def _finish(self, row_id: int, state: str, action: str, outcome: str) -> None:
        with Session(self._engine) as session:
            finish_inbound(session, row_id, state, action, outcome)

    async def _act(self, row: InboundSms, action: KeywordAction, held: list[_Held]) -> str:
        if action.kind is ActionKind.SUBSCRIBE:
            return await self._subscribe(row, action, held)
        if action.kind is ActionKind.STOP:
            return await self._stop(row, action, held)
        if action.kind is ActionKind.PIN:
            return await self._pin(row, action, held)
        await self._reply(row, action, "help")  # HELP, and anything we do not know
        return "answered with help"

    async def _subscribe(self, row: InboundSms, action: KeywordAction, held: list[_Held]) -> str:
        assert action.route is not None
        price_point_id = action.route.price_point_id
        if any(h.price_point_id == price_point_id and h.status in STOPPABLE for h in held):
            await self._reply(row, action, "already_subscribed")
            return "already subscribed"
        carrier = self._registry.carriers[row.carrier_id]
        price = next(p for p in carrier.price_points if p.id == price_point_id)
        request = StartSubscriptionRequest(
            msisdn=row.msisdn, product_id=price.product,
            amount_minor=self._registry.amount_minor(carrier.id, price),
            currency=self._registry.currency_of(carrier.id), period=price.period,
            carrier_id=carrier.id)
        try:
            started = await self._subscriptions.start_subscription(request)
        except SubscriptionRequestError as exc:
            # e.g. a live subscription to the product through another price point
            log.info("mo %s: subscription refused: %s", row.id, exc)
            await self._reply(row, action, "refused")
            return f"refused: {exc}"
        if self._welcome:
            await self._send(welcome_key(str(started.key_prefix)), row, action, "welcome")
        return f"started {started.workflow_id}"

    async def _stop(self, row: InboundSms, action: KeywordAction, held: list[_Held]) -> str:
        cancelled = []
        for subscription in (h for h in held if h.status in STOPPABLE):
            try:
                await self._subscriptions.cancel_subscription(subscription.id)
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise  # Temporal out of reach: the row stays open, acted on again
                continue  # its workflow has ended already
            except WorkflowUpdateFailedError as exc:  # ended meanwhile: nothing to stop
                log.info("mo %s: subscription %s not cancelled: %s", row.id, subscription.id,
                         exc.cause)
                continue
            cancelled.append(subscription.id)
        await self._reply(row, action, "stop_confirmation")
        return f"cancelled {cancelled}" if cancelled else "nothing to cancel"

    async def _pin(self, row: InboundSms, action: KeywordAction, held: list[_Held]) -> str:
        assert action.route is not None and action.pin is not None
        waiting = _waiting(held, action.route.price_point_id)
        if waiting is None:
            await self._reply(row, action, "help")
            return "no subscription awaits a code: answered with help"
        handle = self._subscriptions.client.get_workflow_handle(f"subscription-{waiting.id}")
        try:
            await handle.execute_update(CONFIRM_OPT_IN, action.pin)
        except WorkflowUpdateFailedError as exc:  # a wrong code, or no longer waiting
            log.info("mo %s: code refused by subscription %s: %s", row.id, waiting.id,
                     exc.cause)
            await self._reply(row, action, "refused")
            return f"code refused by subscription-{waiting.id}"
        return f"code confirmed for subscription-{waiting.id}"

    # -- answering -----------------------------------------------------------------------------

    async def _reply(self, row: InboundSms, action: KeywordAction, kind: str) -> NoticeOutput:
        return await self._send(reply_key(row), row, action, kind)

    async def _send(self, key: str, row: InboundSms, action: KeywordAction,
                    kind: str) -> NoticeOutput:
        assert action.route is not None
        carrier = self._registry.carriers[row.carrier_id]
        locale = action.language or carrier.locale
        price = next(p for p in carrier.price_points if p.id == action.route.price_point_id)
        currency = self._registry.currency_of(carrier.id)
        amount = format_major(self._registry.amount_minor(carrier.id, price), currency)
        text = notice_text(kind, locale, product=action.route.service,
                           price=f"{amount} {currency}", short_code=action.route.short_code,
                           support=action.route.support)
        return await self._sender.send(key, row.carrier_id, row.msisdn, kind, locale, text,
                                       source=action.route.short_code)


def _waiting(held: Sequence[_Held], price_point_id: str) -> _Held | None:
    """The subscription awaiting a code: the one for this short code's price point first."""
    pending = [h for h in held if h.status == PENDING_OPT_IN]
    return next((h for h in pending if h.price_point_id == price_point_id),
                pending[-1] if pending else None)
