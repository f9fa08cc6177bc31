"""CAMARA Carrier Billing (and Carrier Billing Refund): OAuth2 bearer, an ``x-correlator`` on
every request, one-step ``createPayment`` and the two-step prepare → validate (SMS code) →
confirm. Results arrive asynchronously as CloudEvents to the ``sink`` we give, authenticated by
the ``sinkCredential`` access token we hand over.

A repeated ``clientCorrelator`` is refused with 400 rather than replayed, so a retry must not
resend blindly: the activity looks the payment up (``retrievePayments``) before sending again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from carriers.base import (
    Capability,
    ChargeRequest,
    Lookup,
    LookupResult,
    OperationResult,
    Outcome,
    RefundRequest,
    StatusRequest,
)
from carriers.http import HttpAdapter, HttpReply, HttpTransport, refusal
from carriers.redaction import redact
from carriers.reports import CallbackRejected, CarrierReport
from models.money import to_decimal

EVENT_PREFIXES = ("org.camaraproject.carrier-billing.", "org.camaraproject.carrier-billing-refund.")
PAGE_SIZE = 100
MAX_PAGES = 20
# how far back a look-up searches: a settlement happens within days of the request
# a payment is created at the carrier when our request reaches it: search from a little before
# we first sent it (clocks differ) to a day after (retries of the same request)
LOOKUP_MARGIN = timedelta(minutes=10)
LOOKUP_WINDOW = timedelta(days=1)
# the spec's sink must be https; plain http is only for a receiver on this machine (tests, demo)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def check_sink_url(url: str, *, allow_insecure: bool = False) -> None:
    """Refuses a sink the carrier would be told to call over plain HTTP (the spec demands
    https: the sinkCredential travels to it), except on loopback or when a dev setting allows
    it. A ValueError here stops the worker at start-up, before any request names the sink."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and (allow_insecure or parts.hostname in LOOPBACK_HOSTS):
        return
    raise ValueError(f"CAMARA sink {url!r}: the callback base URL must be https "
                     "(plain http only on 127.0.0.1/localhost, or when insecure sinks are allowed)")


class PreparedPayment(BaseModel):
    result: OperationResult
    payment_id: str | None = None
    authorization_id: str | None = None


def _denial_outcome(reason: str) -> Outcome:
    # operators state the business reason in words; out-of-credit is the one worth retrying
    lowered = reason.lower()
    return Outcome.INSUFFICIENT_FUNDS if "insufficient" in lowered or "balance" in lowered \
        else Outcome.REJECTED


def outcome_of(status: str | None, reference: str | None, reason: str = "") -> OperationResult:
    # the carrier's words reach workflow histories: masked here, whichever way they came
    reason = redact(reason)
    if status == "succeeded" and reference:
        return OperationResult(outcome=Outcome.SUCCEEDED, carrier_reference=reference)
    if status in ("processing", "pending_validation", "reserved") and reference:
        return OperationResult(outcome=Outcome.PENDING, carrier_reference=reference)
    if status in ("denied", "cancelled"):
        return OperationResult(outcome=_denial_outcome(reason), carrier_code=status,
                               message=reason)
    return OperationResult(outcome=Outcome.UNKNOWN, message=redact(f"status {status!r}"))


def _error(reply: HttpReply, body: Any) -> OperationResult:
    code = str(body.get("code", "")) if isinstance(body, dict) else ""
    message = redact(str(body.get("message", ""))) if isinstance(body, dict) else ""
    if code == "CARRIER_BILLING.PAYMENT_DENIED":
        return OperationResult(outcome=_denial_outcome(message), carrier_code=code,
                               message=message)
    if code == "CARRIER_BILLING.PAYMENT_CANCELLED":
        # a cancelled payment is never charged: confirming or cancelling it again moves nothing
        return OperationResult(outcome=Outcome.REJECTED, carrier_code=code, message=message)
    if code in ("CARRIER_BILLING_REFUND.REFUND_DENIED",
                "CARRIER_BILLING_REFUND.PAYMENT_NOT_ELIGIBLE_FOR_REFUND"):
        # the spec's 403s of a refund the operator's rules refuse: nothing was credited, and
        # asking again gets the same answer (not a credential problem to retry)
        return OperationResult(outcome=Outcome.REJECTED, carrier_code=code, message=message)
    refused = refusal(reply)
    if refused is not None:
        return refused
    if reply.status_code == 409 or (reply.status_code == 400 and "clientCorrelator" in message):
        # the correlator was used, or the payment exists: our earlier request got through,
        # whatever the wording; settle by looking it up, never by sending again
        return OperationResult(outcome=Outcome.UNKNOWN, carrier_code=code, message=message)
    if reply.status_code in (400, 404, 422):
        return OperationResult(outcome=Outcome.REJECTED, carrier_code=code, message=message)
    return OperationResult(outcome=Outcome.UNKNOWN, carrier_code=code or str(reply.status_code),
                           message=message or f"unexpected HTTP {reply.status_code}")


def _json(reply: HttpReply) -> Any:
    try:
        return json.loads(reply.text) if reply.text else None
    except json.JSONDecodeError:
        return None


def map_accepted(reply: HttpReply, payment_id: str, what: str) -> OperationResult:
    """confirmPayment and cancelPayment answer 202 without a body: the request is accepted and
    its result comes by event or look-up. Pending, never unknown: the payment is known."""
    if reply.status_code == 202:
        return OperationResult(outcome=Outcome.PENDING, carrier_reference=payment_id,
                               message=f"{what} accepted")
    if reply.status_code in (200, 201):  # older operators answer the payment itself
        return map_created(reply, "paymentId", "paymentStatus")
    return _error(reply, _json(reply))


def map_created(reply: HttpReply, id_field: str, status_field: str) -> OperationResult:
    body = _json(reply)
    if reply.status_code not in (200, 201):
        return _error(reply, body)
    if not isinstance(body, dict):
        return OperationResult(outcome=Outcome.UNKNOWN,
                               message=f"malformed response (HTTP {reply.status_code})")
    return outcome_of(body.get(status_field), body.get(id_field))


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def sink_token(secret: str, key: str) -> str:
    """The sink credential of one operation: valid for events about that operation only, so
    a credential seen on one payment cannot settle another."""
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def parse_event(body: bytes, headers: dict[str, str], secret: str,
                key: str | None) -> CarrierReport:
    """A CloudEvent delivered to our sink; the sink URL carries the idempotency key."""
    if not key or not hmac.compare_digest(headers.get("authorization", ""),
                                          f"Bearer {sink_token(secret, key)}"):
        raise CallbackRejected("bad sink credential")
    try:
        event = json.loads(body)
        kind, data = str(event["type"]), event["data"]
        if event.get("specversion") != "1.0" or not kind.startswith(EVENT_PREFIXES):
            raise ValueError(kind)
    except (ValueError, KeyError, TypeError):
        raise CallbackRejected("not a carrier billing CloudEvent") from None
    reference = data.get("refundId") or data.get("paymentId")
    state = kind.rsplit("-", 1)[-1]  # ...payment-completed, ...refund-denied
    status = {"completed": "succeeded", "denied": "denied", "cancelled": "cancelled"}.get(
        state, "processing")
    result = outcome_of(status, reference, str(data.get("denialReason", "")))
    return CarrierReport(idempotency_key=key, outcome=result.outcome.value,
                         carrier_reference=result.carrier_reference,
                         carrier_code=result.carrier_code, message=result.message)


class CamaraAdapter(HttpAdapter):
    capabilities = frozenset({Capability.CHARGE, Capability.REFUND, Capability.STATUS})

    def __init__(self, transport: HttpTransport, callback_url: str, sink_token: str,
                 refund_base_url: str | None = None, *, allow_insecure_sink: bool = False) -> None:
        super().__init__(transport)
        check_sink_url(callback_url, allow_insecure=allow_insecure_sink)
        self._callback_url = callback_url
        self._sink_token = sink_token
        self._refund_base_url = refund_base_url.rstrip("/") if refund_base_url else None

    def _sink(self, key: str) -> dict[str, Any]:
        expires = (datetime.now(UTC) + timedelta(days=30)).isoformat()
        return {"sink": f"{self._callback_url}/{key}",
                "sinkCredential": {"credentialType": "ACCESSTOKEN",
                                   "accessToken": sink_token(self._sink_token, key),
                                   "accessTokenExpiresUtc": expires, "accessTokenType": "bearer"}}

    @staticmethod
    def _amount_transaction(key: str, msisdn: str | None, amount_minor: int, currency: str,
                            description: str, reference: str) -> dict[str, Any]:
        transaction: dict[str, Any] = {
            "clientCorrelator": key, "referenceCode": reference,
            "paymentAmount": {"chargingInformation": {
                "amount": float(to_decimal(amount_minor, currency)), "currency": currency,
                "description": description}}}
        if msisdn:
            transaction["phoneNumber"] = msisdn
        return transaction

    async def _post(self, operation: str, key: str, path: str, body: dict[str, Any],
                    id_field: str, status_field: str) -> OperationResult:
        return await self._transport.send(
            operation=operation, idempotency_key=key, method="POST", path=path, json=body,
            headers={"x-correlator": key},
            mapper=lambda reply: map_created(reply, id_field, status_field))

    def _payment_body(self, request: ChargeRequest) -> dict[str, Any]:
        return {"amountTransaction": self._amount_transaction(
            request.idempotency_key, request.msisdn, request.amount_minor, request.currency,
            request.description, request.reference_code), **self._sink(request.idempotency_key)}

    async def charge(self, request: ChargeRequest) -> OperationResult:
        return await self._post("charge", request.idempotency_key, "/payments",
                                self._payment_body(request), "paymentId", "paymentStatus")

    async def prepare_payment(self, request: ChargeRequest) -> PreparedPayment:
        """Two-step: reserve the amount; the subscriber receives a code by SMS."""
        found: dict[str, Any] = {}

        def mapper(reply: HttpReply) -> OperationResult:
            body = _json(reply)
            if isinstance(body, dict):
                found.update(body)
            return map_created(reply, "paymentId", "paymentStatus")

        result = await self._transport.send(
            operation="prepare", idempotency_key=request.idempotency_key, method="POST",
            path="/payments/prepare", json=self._payment_body(request),
            headers={"x-correlator": request.idempotency_key}, mapper=mapper)
        info = found.get("validationInfo")
        # the spec puts it in validationInfo (action "validate"); some operators at the top
        authorization = (info.get("authorizationId") if isinstance(info, dict) else None) \
            or found.get("authorizationId")
        return PreparedPayment(result=result, payment_id=found.get("paymentId"),
                               authorization_id=str(authorization) if authorization else None)

    async def validate_payment(self, key: str, payment_id: str, authorization_id: str,
                               code: str) -> OperationResult:
        def mapper(reply: HttpReply) -> OperationResult:
            if reply.status_code == 204:
                return OperationResult(outcome=Outcome.PENDING, carrier_reference=payment_id)
            return _error(reply, _json(reply))

        return await self._transport.send(
            operation="validate", idempotency_key=key, method="POST",
            path=f"/payments/{payment_id}/validate", headers={"x-correlator": key},
            json={"authorizationId": authorization_id, "code": code}, mapper=mapper)

    async def confirm_payment(self, key: str, payment_id: str,
                              msisdn: str | None = None) -> OperationResult:
        """202: confirmed, the debit's result comes by event or look-up (pending)."""
        return await self._transport.send(
            operation="confirm", idempotency_key=key, method="POST",
            path=f"/payments/{payment_id}/confirm", headers={"x-correlator": key},
            json={"phoneNumber": msisdn} if msisdn else {},
            mapper=lambda reply: map_accepted(reply, payment_id, "confirmation"))

    async def cancel_payment(self, key: str, payment_id: str,
                             msisdn: str | None = None) -> OperationResult:
        """Cancels a prepared (not yet confirmed) payment: nothing is charged. 202 is pending
        until the payment-cancelled event or a look-up says cancelled; a 409 "already
        confirmed" may have moved money and is settled by look-up (unknown)."""
        return await self._transport.send(
            operation="cancel", idempotency_key=key, method="POST",
            path=f"/payments/{payment_id}/cancel", headers={"x-correlator": key},
            json={"phoneNumber": msisdn} if msisdn else {},
            mapper=lambda reply: map_accepted(reply, payment_id, "cancellation"))

    def _refund_path(self, payment_id: str) -> str:
        """The refund API may live at its own base URL (an absolute URL overrides the
        transport's base; credentials and records are the same)."""
        return f"{self._refund_base_url}/payments/{payment_id}/refunds" if self._refund_base_url \
            else f"/payments/{payment_id}/refunds"

    async def refund(self, request: RefundRequest) -> OperationResult:
        """createRefund of the Carrier Billing Refund API. The whole charge is a ``total``
        refund, whose ``refundAmount`` names no amount (the operator refunds the payment); less
        than the charge is a ``partial`` one, which must name its amount."""
        partial = (request.original_amount_minor is not None
                   and request.amount_minor < request.original_amount_minor)
        refund_amount: dict[str, Any] = {}
        if partial:
            refund_amount = {"chargingInformation": {
                "amount": float(to_decimal(request.amount_minor, request.currency)),
                "currency": request.currency, "description": request.description}}
        body = {"type": "partial" if partial else "total", "reason": request.description,
                "amountTransaction": {"clientCorrelator": request.idempotency_key,
                                      "referenceCode": request.reference_code,
                                      "refundAmount": refund_amount},
                **self._sink(request.idempotency_key)}
        return await self._post("refund", request.idempotency_key,
                                self._refund_path(request.original_carrier_reference), body,
                                "refundId", "refundStatus")

    async def status(self, request: StatusRequest) -> LookupResult:
        """retrievePayments (or the payment's refunds), matched on our clientCorrelator. Charges
        are searched in a narrow creation-date window around when we first sent them, so the
        search stays a page or two however busy the carrier is."""
        if request.operation == "refund":
            path, id_field, status_field = (
                self._refund_path(request.original_carrier_reference or ""), "refundId",
                "refundStatus")
        else:
            path, id_field, status_field = "/payments", "paymentId", "paymentStatus"
        sent = _utc(request.sent_at) if request.sent_at else datetime.now(UTC)
        last = max(_utc(request.last_sent_at) if request.last_sent_at else sent, sent)
        window = {"paymentCreationDate.gte": (sent - LOOKUP_MARGIN).isoformat(),
                  "paymentCreationDate.lte": (last + LOOKUP_WINDOW).isoformat()}
        for page in range(1, MAX_PAGES + 1):
            items: list[dict[str, Any]] = []

            def mapper(reply: HttpReply, items: list[dict[str, Any]] = items,
                       page: int = page) -> LookupResult:
                body = _json(reply)
                code = str(body.get("code", "")) if isinstance(body, dict) else ""
                if reply.status_code == 400 and page > 1 and code.endswith(".OUT_OF_RANGE"):
                    return LookupResult.not_found()  # the previous page was the last, and full
                if reply.status_code != 200:
                    return LookupResult.failure_of(_error(reply, body))
                if not isinstance(body, list):
                    return LookupResult.failed("malformed list")
                items.extend(x for x in body if isinstance(x, dict))
                return LookupResult.not_found()

            params = {"page": str(page), "perPage": str(PAGE_SIZE)}
            if request.operation == "charge":
                # oldest first: new payments land after what we read, so pages never shift
                params |= {"order": "asc", **window}
            answer = await self._transport.lookup(
                operation="status", idempotency_key=request.idempotency_key, method="GET",
                path=path, params=params,
                headers={"x-correlator": request.idempotency_key}, mapper=mapper)
            if answer.lookup is not Lookup.NOT_FOUND:
                return answer
            for item in items:
                transaction = item.get("amountTransaction") or {}
                if transaction.get("clientCorrelator") == request.idempotency_key:
                    return LookupResult.of(outcome_of(item.get(status_field), item.get(id_field),
                                                      redact(str(item.get("denialReason", "")))))
            if len(items) < PAGE_SIZE:
                return LookupResult.not_found()
        return LookupResult.failed("too many payments in the window to search")
