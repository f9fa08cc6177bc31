"""CAMARA Carrier Billing operator: one-step and two-step payments, refunds, CloudEvents to the
client's sink; a repeated clientCorrelator is refused with 400."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from simulators.books import InsufficientFunds, RefundRefused
from simulators.core import (
    SimCarrier,
    SimulatorCore,
    drop_connection,
    lose_answer_after_debit,
    post_callback,
    refuse_before_debit,
)

PROTOCOL = "camara"
EVENT_DELAY_SECONDS = 0.2
BASE = "/{carrier}/camara/carrier-billing/v0"


def problem(status: int, code: str, message: str, correlator: str = "") -> web.Response:
    return web.json_response({"status": status, "code": code, "message": message}, status=status,
                             headers={"x-correlator": correlator} if correlator else None)


@dataclass
class Payment:
    payment_id: str
    carrier_id: str
    msisdn: str
    amount: Decimal
    transaction: dict[str, Any]
    status: str
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    denial_reason: str | None = None
    authorization_id: str | None = None
    code: str | None = None
    book_reference: str | None = None
    ready_at: float = 0.0
    final_status: str | None = None
    refunds: list[dict[str, Any]] = field(default_factory=list)

    def current_status(self) -> str:
        if self.final_status and time.monotonic() >= self.ready_at:
            self.status, self.final_status = self.final_status, None
        return self.status

    def view(self) -> dict[str, Any]:
        view = {"paymentId": self.payment_id, "paymentStatus": self.current_status(),
                "amountTransaction": self.transaction, "paymentCreationDate": self.created}
        if self.status == "denied" and self.denial_reason:
            view["denialReason"] = self.denial_reason
        return view


class CamaraOperator:
    def __init__(self, core: SimulatorCore) -> None:
        self.core = core
        self.payments: dict[str, Payment] = {}
        self.correlators: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(f"{BASE}/payments", self.create)
        app.router.add_get(f"{BASE}/payments", self.list_payments)
        app.router.add_post(f"{BASE}/payments/prepare", self.prepare)
        app.router.add_get(f"{BASE}/payments/{{payment_id}}", self.get_payment)
        app.router.add_post(f"{BASE}/payments/{{payment_id}}/validate", self.validate)
        app.router.add_post(f"{BASE}/payments/{{payment_id}}/confirm", self.confirm)
        app.router.add_post(f"{BASE}/payments/{{payment_id}}/refunds", self.create_refund)
        app.router.add_get(f"{BASE}/payments/{{payment_id}}/refunds", self.list_refunds)
        app.router.add_get("/_control/camara/otp", self.otp)

    # -- plumbing ------------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> SimCarrier:
        carrier = self.core.carrier(request, PROTOCOL)
        if not self.core.http_auth_ok(request, carrier):
            raise web.HTTPUnauthorized(text=json.dumps(
                {"status": 401, "code": "UNAUTHENTICATED", "message": "invalid token"}),
                content_type="application/json")
        return carrier

    def _payment(self, request: web.Request, carrier: SimCarrier) -> Payment:
        payment = self.payments.get(request.match_info["payment_id"])
        if payment is None or payment.carrier_id != carrier.carrier_id:
            raise web.HTTPNotFound(text=json.dumps(
                {"status": 404, "code": "NOT_FOUND", "message": "no such payment"}),
                content_type="application/json")
        return payment

    def _notify(self, body: dict[str, Any], kind: str, data: dict[str, Any],
                copies: int = 1) -> None:
        sink = body.get("sink")
        token = (body.get("sinkCredential") or {}).get("accessToken", "")
        if not sink:
            return
        event = {"id": str(uuid.uuid4()), "source": "https://operator.example/carrier-billing",
                 "type": f"org.camaraproject.{kind}", "specversion": "1.0",
                 "datacontenttype": "application/json", "time": datetime.now(UTC).isoformat(),
                 "data": data}
        for _ in range(copies):
            task = asyncio.create_task(self._deliver(str(sink), token, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _deliver(sink: str, token: str, event: dict[str, Any]) -> None:
        await asyncio.sleep(EVENT_DELAY_SECONDS)
        await post_callback(sink, json.dumps(event).encode(), {"Authorization": f"Bearer {token}"})

    @staticmethod
    def _parse(body: dict[str, Any], carrier: SimCarrier) -> tuple[str, Decimal, str]:
        transaction = body["amountTransaction"]
        info = transaction["paymentAmount"]["chargingInformation"]
        amount = Decimal(str(info["amount"]))
        if info["currency"] != carrier.currency or amount <= 0:
            raise ValueError("amount or currency")
        return str(transaction["clientCorrelator"]), amount, str(transaction.get("phoneNumber", ""))

    async def _start(self, request: web.Request, two_step: bool) -> web.StreamResponse:
        carrier = self._authorised(request)
        correlator_header = request.headers.get("x-correlator", "")
        try:
            body = await request.json()
            key, amount, msisdn = self._parse(body, carrier)
        except (ValueError, KeyError, TypeError, InvalidOperation) as exc:
            return problem(400, "INVALID_ARGUMENT", f"invalid input: {exc}", correlator_header)
        if (carrier.carrier_id, key) in self.correlators:
            return problem(400, "INVALID_ARGUMENT", "clientCorrelator already used",
                           correlator_header)
        fault = self.core.take_fault(carrier.carrier_id, msisdn)
        kind = fault.kind if fault else ""
        refusal = await refuse_before_debit(
            fault, lambda: web.Response(status=201, text="{payment", content_type="application/json"))
        if refusal is not None:
            return refusal

        self.correlators.add((carrier.carrier_id, key))
        payment = Payment(f"{carrier.carrier_id}-pay-{next(self._ids):08d}", carrier.carrier_id,
                          msisdn, amount, body["amountTransaction"], "processing")
        self.payments[payment.payment_id] = payment
        if two_step:
            payment.status = "pending_validation"
            payment.authorization_id = secrets.token_hex(6)
            payment.code = f"{secrets.randbelow(10**6):06d}"  # "sent" to the subscriber by SMS
            payment.transaction["_sink"] = body.get("sink")
            payment.transaction["_sinkCredential"] = body.get("sinkCredential")
            reply = payment.view() | {"authorizationId": payment.authorization_id}
            reply["amountTransaction"] = self._public(payment.transaction)
            return web.json_response(reply, status=201)
        self._settle(carrier, payment, body, kind)
        await lose_answer_after_debit(request, fault)
        return web.json_response(payment.view(), status=201,
                                 headers={"x-correlator": correlator_header})

    @staticmethod
    def _public(transaction: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in transaction.items() if not k.startswith("_")}

    def _settle(self, carrier: SimCarrier, payment: Payment, body: dict[str, Any],
                fault_kind: str) -> None:
        """Debits now; the outcome shows (and is notified) a moment later."""
        book = self.core.books[carrier.carrier_id]
        try:
            if fault_kind == "insufficient_funds":
                raise InsufficientFunds()
            txn = book.charge(payment.msisdn, payment.amount,
                              str(payment.transaction["clientCorrelator"]), payment.payment_id)
            payment.book_reference = txn.server_reference
            payment.final_status, event = "succeeded", "payment-completed"
            data = {"paymentId": payment.payment_id, "status": "succeeded",
                    "description": "payment completed", "paymentDate": datetime.now(UTC).isoformat()}
        except InsufficientFunds:
            payment.final_status, event = "denied", "payment-denied"
            payment.denial_reason = "insufficient balance"
            data = {"paymentId": payment.payment_id, "status": "denied",
                    "description": "payment denied", "denialReason": payment.denial_reason}
        payment.ready_at = time.monotonic() + EVENT_DELAY_SECONDS
        copies = {"no_callback": 0, "duplicate_callback": 2}.get(fault_kind, 1)
        self._notify(body, f"carrier-billing.v0.{event}", data, copies)

    # -- endpoints -----------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        return await self._start(request, two_step=False)

    async def prepare(self, request: web.Request) -> web.StreamResponse:
        return await self._start(request, two_step=True)

    async def validate(self, request: web.Request) -> web.Response:
        carrier = self._authorised(request)
        payment = self._payment(request, carrier)
        body = await request.json()
        if payment.status != "pending_validation":
            return problem(409, "CARRIER_BILLING.PAYMENT_CONFIRMED", "not awaiting validation")
        if body.get("authorizationId") != payment.authorization_id:
            return problem(422, "CARRIER_BILLING.INVALID_AUTHORIZATION_ID", "invalid authorizationId")
        if body.get("code") != payment.code:
            return problem(422, "CARRIER_BILLING.INVALID_CODE", "invalid code")
        payment.status = "reserved"
        return web.Response(status=204)

    async def confirm(self, request: web.Request) -> web.Response:
        carrier = self._authorised(request)
        payment = self._payment(request, carrier)
        if payment.current_status() != "reserved":
            return problem(409, "CARRIER_BILLING.PAYMENT_CONFIRMED",
                           f"payment is {payment.status}")
        sink = {"sink": payment.transaction.pop("_sink", None),
                "sinkCredential": payment.transaction.pop("_sinkCredential", None)}
        self._settle(carrier, payment, sink, "")
        payment.ready_at = 0.0  # two-step confirmation answers synchronously
        return web.json_response(payment.view())

    async def get_payment(self, request: web.Request) -> web.Response:
        carrier = self._authorised(request)
        return web.json_response(self._payment(request, carrier).view())

    async def list_payments(self, request: web.Request) -> web.Response:
        carrier = self._authorised(request)
        page, per_page = int(request.query.get("page", "1")), int(request.query.get("perPage", "20"))
        since = request.query.get("paymentCreationDate.gte", "")
        mine = [p for p in self.payments.values()
                if p.carrier_id == carrier.carrier_id and p.created >= since]
        if request.query.get("order", "desc") == "desc":
            mine.reverse()
        window = mine[(page - 1) * per_page: page * per_page]
        return web.json_response([p.view() | {"amountTransaction": self._public(p.transaction)}
                                  for p in window])

    async def create_refund(self, request: web.Request) -> web.StreamResponse:
        carrier = self._authorised(request)
        payment = self._payment(request, carrier)
        try:
            body = await request.json()
            transaction = body["amountTransaction"]
            key = str(transaction["clientCorrelator"])
            amount = Decimal(str(transaction["paymentAmount"]["chargingInformation"]["amount"]))
        except (ValueError, KeyError, TypeError, InvalidOperation) as exc:
            return problem(400, "INVALID_ARGUMENT", f"invalid input: {exc}")
        if (carrier.carrier_id, key) in self.correlators:
            return problem(400, "INVALID_ARGUMENT", "clientCorrelator already used")
        fault = self.core.take_fault(carrier.carrier_id, payment.msisdn)
        self.correlators.add((carrier.carrier_id, key))
        refund = {"refundId": f"{payment.payment_id}-r{len(payment.refunds) + 1}",
                  "refundStatus": "succeeded", "type": body.get("type", "total"),
                  "refundCreationDate": datetime.now(UTC).isoformat(),
                  "amountTransaction": transaction}
        try:
            if payment.book_reference is None:
                raise RefundRefused("payment not charged")
            self.core.books[carrier.carrier_id].refund(payment.msisdn, amount, key, "refund",
                                                       payment.book_reference)
            event = "refund-completed"
        except RefundRefused as exc:
            refund["refundStatus"], refund["denialReason"] = "denied", str(exc)
            event = "refund-denied"
        payment.refunds.append(refund)
        self._notify(body, f"carrier-billing-refund.v0.{event}",
                     {"paymentId": payment.payment_id, "refundId": refund["refundId"],
                      "status": refund["refundStatus"], "description": event})
        if fault and fault.kind == "reset_after_debit":
            drop_connection(request)
        return web.json_response(refund, status=201)

    async def list_refunds(self, request: web.Request) -> web.Response:
        carrier = self._authorised(request)
        return web.json_response(self._payment(request, carrier).refunds)

    async def otp(self, request: web.Request) -> web.Response:
        """Test hook: the code the subscriber would have received by SMS."""
        payment = self.payments.get(request.query.get("paymentId", ""))
        if payment is None:
            raise web.HTTPNotFound()
        return web.json_response({"code": payment.code})
