"""Delivery activities: grant at the game backend what a payment bought, and take it back after
a refund.

The request is recorded (``Delivery``, state ``sending``) before it leaves, with its terms fixed
(variant, quantity or until), so every retry sends the same body under the same grant id and the
backend recognises it. An answer that leaves us unsure (timeout, dropped connection, 5xx) raises,
and Temporal retries; a retry after a send first looks the grant up, so a grant whose answer was
lost is found, never made twice. A definite refusal (4xx) is returned as ``permanent``: the
workflow refunds the payment.
"""

from __future__ import annotations

import calendar
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.delivery_messages import DeliveryInput, DeliveryOutput, RevokeInput, RevokeOutput
from catalogue import VariantNotFound, select_variant
from models import delivery as store
from models.db import in_db_thread
from models.delivery import Delivery, DeliveryState
from models.tables import Period, PricePoint, utcnow

log = logging.getLogger(__name__)

# the backend did not act, and cannot until someone changes something; any other 4xx is a
# final refusal for this grant
_RETRY_STATUSES = {401, 403, 408, 425, 429}
_FINAL_STATES = (DeliveryState.DELIVERED, DeliveryState.REFUSED, DeliveryState.REVOKED)


class DeliveryConfigurationError(ApplicationError):
    """Our own mistake (a key reused, a product without variants, terms we cannot compute):
    retrying cannot fix it, and an operator must look."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="ConfigurationError", non_retryable=True)


class DeliveryUncertain(ApplicationError):
    """The backend may or may not have acted: retried with the same grant id."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="DeliveryUncertain")


def _add_months(moment: datetime, months: int) -> datetime:
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def _period_end(start: datetime, price: PricePoint) -> datetime:
    if price.period == Period.DAILY:
        return start + timedelta(days=1)
    if price.period == Period.WEEKLY:
        return start + timedelta(weeks=1)
    if price.period == Period.MONTHLY:
        return _add_months(start, 1)
    if price.period == Period.INTERVAL and price.interval_seconds:
        return start + timedelta(seconds=price.interval_seconds)
    raise DeliveryConfigurationError(f"price point {price.id} ({price.period}) buys no period of access")


def _aware(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes for what was stored in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _reason(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    return str(error) if error else f"http_{response.status_code}"


class DeliveryActivities:
    def __init__(self, engine: Engine, base_url: str, token: str, deployment_id: str = "dev",
                 timeout_seconds: float = 5.0) -> None:
        self._engine = engine
        self._base_url = base_url.rstrip("/")
        self._token = token
        self._deployment_id = deployment_id
        self._timeout = timeout_seconds
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self._base_url, timeout=self._timeout,
                headers={"Authorization": f"Bearer {self._token}"})
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _subscriber_ref(self, subscriber_id: int) -> str:
        # never the MSISDN: the backend needs a stable account, not a phone number
        return f"{self._deployment_id}-{subscriber_id}"

    # -- database (run in threads) ----------------------------------------------------------------

    def _begin(self, request: DeliveryInput) -> Delivery:
        """The delivery's row: the one an earlier attempt recorded, or a new one with its terms
        fixed now."""
        with Session(self._engine, expire_on_commit=False) as session:
            existing = store.find(session, request.idempotency_key)
            if existing is not None:
                return self._same_delivery(existing, request)
            try:
                variant = select_variant(session, request.product_id, request.country_code,
                                         request.locale, request.price_point_id)
            except VariantNotFound as exc:
                raise DeliveryConfigurationError(str(exc)) from exc
            row = Delivery(
                grant_id=request.idempotency_key, subscription_id=request.subscription_id,
                subscriber_id=request.subscriber_id, cycle=request.cycle,
                product_id=request.product_id, variant_id=variant.id, sku=variant.sku,
                paid_minor=request.paid_minor, currency=request.currency,
                state=DeliveryState.SENDING)
            if variant.quantity is not None:
                if request.service_seconds is not None:
                    # units cannot be shared out by time: a partial payment buys none of them
                    row.state, row.reason = DeliveryState.REFUSED, "partial_payment"
                row.quantity = variant.quantity
            else:
                row.until = self._until(session, request)
            session.add(row)
            try:
                session.commit()
            except IntegrityError:
                # a concurrent attempt recorded it first: its terms stand
                session.rollback()
                raced = store.find(session, request.idempotency_key)
                if raced is None:
                    raise
                return self._same_delivery(raced, request)
            return row

    @staticmethod
    def _until(session: Session, request: DeliveryInput) -> datetime:
        start = utcnow().replace(microsecond=0)
        if request.service_seconds is not None:
            if request.service_seconds <= 0:
                raise DeliveryConfigurationError("a partial payment that bought no time")
            return start + timedelta(seconds=request.service_seconds)
        price = session.get(PricePoint, request.price_point_id) if request.price_point_id else None
        if price is None:
            raise DeliveryConfigurationError(
                f"{request.idempotency_key}: no price point {request.price_point_id!r} to tell "
                "how long the access lasts")
        return _period_end(start, price)

    @staticmethod
    def _same_delivery(row: Delivery, request: DeliveryInput) -> Delivery:
        recorded = (row.subscription_id, row.subscriber_id, row.cycle, row.product_id,
                    row.paid_minor, row.currency)
        asked = (request.subscription_id, request.subscriber_id, request.cycle, request.product_id,
                 request.paid_minor, request.currency)
        if recorded != asked:
            raise DeliveryConfigurationError(
                f"grant id {row.grant_id} already names another delivery {recorded}, not {asked}")
        return row

    def _count_send(self, grant_id: str) -> bool:
        with Session(self._engine, expire_on_commit=False) as session:
            return store.count_send(session, grant_id)

    def _conclude(self, grant_id: str, to: DeliveryState, **facts: object) -> Delivery:
        with Session(self._engine, expire_on_commit=False) as session:
            return store.transition(session, grant_id, to, (DeliveryState.SENDING,), **facts)

    def _read(self, grant_id: str) -> Delivery | None:
        with Session(self._engine, expire_on_commit=False) as session:
            return store.find(session, grant_id)

    def _mark_revoked(self, grant_id: str, reason: str) -> Delivery:
        with Session(self._engine, expire_on_commit=False) as session:
            return store.transition(session, grant_id, DeliveryState.REVOKED,
                                    (DeliveryState.SENDING, DeliveryState.DELIVERED),
                                    revoke_reason=reason, revoked_at=utcnow())

    # -- the backend ------------------------------------------------------------------------------

    def _body(self, row: Delivery) -> dict[str, Any]:
        body: dict[str, Any] = {"grant_id": row.grant_id,
                                "subscriber_ref": self._subscriber_ref(row.subscriber_id),
                                "sku": row.sku}
        if row.quantity is not None:
            body["quantity"] = row.quantity
        else:
            assert row.until is not None
            body["until"] = _aware(row.until).isoformat()
        return body

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http().request(method, path, **kwargs)
        except httpx.TransportError as exc:
            # (timeouts included) the backend may have acted: only a retry can tell
            raise DeliveryUncertain(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500 or response.status_code in _RETRY_STATUSES:
            if response.status_code in (401, 403):
                log.error("the game backend refused our token (%s): fix it; deliveries wait",
                          response.status_code)
            raise DeliveryUncertain(f"{method} {path}: HTTP {response.status_code}")
        return response

    def _check_terms(self, row: Delivery, entitlement: dict[str, Any]) -> None:
        body = self._body(row)
        held = {k: entitlement.get(k) for k in ("grant_id", "subscriber_ref", "sku")}
        if held != {k: body[k] for k in held}:
            raise DeliveryConfigurationError(
                f"the backend's grant {row.grant_id} is not the one we recorded: {held}")

    async def _delivered(self, row: Delivery, entitlement: dict[str, Any]) -> DeliveryOutput:
        """What an entitlement the backend holds for this grant means."""
        self._check_terms(row, entitlement)
        if entitlement.get("status") == "revoked":
            # taken back by someone else: nothing stands for this payment
            done = await in_db_thread(
                self._engine, self._conclude, row.grant_id, DeliveryState.REVOKED,
                entitlement_id=entitlement.get("entitlement_id"), reason="revoked_at_backend")
        else:
            done = await in_db_thread(
                self._engine, self._conclude, row.grant_id, DeliveryState.DELIVERED,
                entitlement_id=str(entitlement["entitlement_id"]))
        return await self._answer(done)

    async def _answer(self, row: Delivery) -> DeliveryOutput:
        """The output a row in a final state stands for."""
        if row.state == DeliveryState.DELIVERED:
            return DeliveryOutput(True, row.variant_id, row.entitlement_id)
        if row.state == DeliveryState.REVOKED:
            # a grant made after a revocation (a late attempt) is taken back too
            await self._ensure_revoked(row)
            return DeliveryOutput(False, row.variant_id, row.entitlement_id,
                                  row.reason or "revoked", permanent=True)
        if row.state == DeliveryState.REFUSED:
            return DeliveryOutput(False, row.variant_id, None, row.reason, permanent=True)
        raise DeliveryUncertain(f"{row.grant_id} is still {row.state}")

    async def _ensure_revoked(self, row: Delivery) -> bool:
        """Revokes the grant at the backend if it holds one; True if it did."""
        if row.sends == 0:
            return False
        response = await self._call("DELETE", f"/entitlements/{row.grant_id}")
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise DeliveryConfigurationError(
                f"revoking {row.grant_id}: HTTP {response.status_code} {_reason(response)}")
        return True

    # -- activities -------------------------------------------------------------------------------

    @activity.defn(name="deliver_product")
    async def deliver_product(self, request: DeliveryInput) -> DeliveryOutput:
        if request.paid_minor <= 0:
            raise DeliveryConfigurationError(
                f"{request.idempotency_key}: nothing is delivered without a payment")
        row = await in_db_thread(self._engine, self._begin, request)
        if row.state in _FINAL_STATES:
            return await self._answer(row)
        key = row.grant_id
        if row.sends > 0:
            # sent before and no answer kept: the backend may hold it already
            found = await self._call("GET", f"/entitlements/{key}")
            if found.status_code == 200:
                return await self._delivered(row, found.json())
            if found.status_code != 404:
                raise DeliveryUncertain(f"looking up {key}: HTTP {found.status_code}")
        if not await in_db_thread(self._engine, self._count_send, key):
            concluded = await in_db_thread(self._engine, self._read, key)
            assert concluded is not None
            return await self._answer(concluded)
        response = await self._call("POST", "/entitlements", json=self._body(row))
        if response.status_code in (200, 201):
            return await self._delivered(row, response.json())
        if response.status_code == 409:
            raise DeliveryConfigurationError(
                f"the backend holds grant {key} with other terms: the key was reused")
        if response.status_code < 400:
            raise DeliveryUncertain(f"granting {key}: unexpected HTTP {response.status_code}")
        # a definite refusal: nothing was granted and nothing will be for this grant
        reason = _reason(response)
        log.warning("delivery %s refused by the game backend: %s", key, reason)
        refused = await in_db_thread(self._engine, self._conclude, key, DeliveryState.REFUSED,
                                     reason=reason)
        return await self._answer(refused)

    @activity.defn(name="revoke_delivery")
    async def revoke_delivery(self, request: RevokeInput) -> RevokeOutput:
        row = await in_db_thread(self._engine, self._read, request.idempotency_key)
        if row is None or row.state == DeliveryState.REFUSED:
            return RevokeOutput(False, None, "never_granted")
        # marked first: a delivery attempt still running then takes back what it grants
        row = await in_db_thread(self._engine, self._mark_revoked, row.grant_id, request.reason)
        if not await self._ensure_revoked(row):
            return RevokeOutput(False, None, "never_granted")
        return RevokeOutput(True, row.entitlement_id, None)

    def all(self) -> list[Callable[..., Any]]:
        return [self.deliver_product, self.revoke_delivery]
