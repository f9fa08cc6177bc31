"""Aggregator with callbacks: requests are acknowledged (202), results are POSTed back later,
signed with HMAC-SHA256; on request it repeats a callback or never sends it."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from carriers.auth import callback_signature
from simulators.books import InsufficientFunds, RefundRefused
from simulators.core import (
    SimCarrier,
    SimulatorCore,
    lose_answer_after_debit,
    post_callback,
    refuse_before_debit,
)

PROTOCOL = "callback-aggregator"
CALLBACK_DELAY_SECONDS = 0.2


@dataclass
class Payment:
    reference: str
    carrier_id: str
    kind: str
    order_id: str
    msisdn: str
    amount: Decimal
    currency: str
    status: str  # completed | failed
    reason: str | None
    ready_at: float

    def view(self) -> dict[str, Any]:
        done = time.monotonic() >= self.ready_at
        id_field = "payment_id" if self.kind == "charge" else "refund_id"
        return {id_field: self.reference, "order_id": self.order_id,
                "status": self.status if done else "pending",
                "reason": self.reason if done else None,
                "amount": str(self.amount), "currency": self.currency}


class CallbackAggregator:
    def __init__(self, core: SimulatorCore) -> None:
        self.core = core
        self.payments: dict[str, Payment] = {}
        self.by_order: dict[tuple[str, str, str], str] = {}
        self._ids = itertools.count(1)
        self._public_keys: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def add_routes(self, app: web.Application) -> None:
        for path, kind in (("payments", "charge"), ("refunds", "refund")):
            app.router.add_post(f"/{{carrier}}/api/{path}", self._submit_for(kind))
            app.router.add_get(f"/{{carrier}}/api/{path}", self._find_for(kind))

    def _public_key(self, carrier: SimCarrier) -> Any:
        if carrier.carrier_id not in self._public_keys:
            private = serialization.load_pem_private_key(carrier.password.encode(), None)
            self._public_keys[carrier.carrier_id] = private.public_key()
        return self._public_keys[carrier.carrier_id]

    async def _verified(self, request: web.Request) -> tuple[SimCarrier, bytes]:
        carrier = self.core.carrier(request, PROTOCOL)
        body = await request.read()
        header = request.headers.get("Authorization", "")
        try:
            claims = jwt.decode(header.removeprefix("Bearer "), self._public_key(carrier),
                                algorithms=["RS256"], options={"require": ["exp", "iat", "iss"]})
        except (jwt.PyJWTError, ValueError):
            raise web.HTTPUnauthorized(text='{"error": "invalid_token"}',
                                       content_type="application/json") from None
        if claims.get("iss") != carrier.username or claims.get(
                "body_sha256") != hashlib.sha256(body).hexdigest():
            raise web.HTTPUnauthorized(text='{"error": "invalid_token"}',
                                       content_type="application/json")
        return carrier, body

    def _find_for(self, kind: str):  # type: ignore[no-untyped-def]
        async def find(request: web.Request) -> web.Response:
            carrier, _ = await self._verified(request)
            reference = self.by_order.get((carrier.carrier_id, kind,
                                           request.query.get("order_id", "")))
            if reference is None:
                return web.json_response({"error": "not_found"}, status=404)
            return web.json_response(self.payments[reference].view())
        return find

    def _submit_for(self, kind: str):  # type: ignore[no-untyped-def]
        async def submit(request: web.Request) -> web.StreamResponse:
            return await self._submit(request, kind)
        return submit

    async def _submit(self, request: web.Request, kind: str) -> web.StreamResponse:
        carrier, raw = await self._verified(request)
        try:
            body = json.loads(raw)
            order_id, amount = str(body["order_id"]), Decimal(str(body["amount"]))
            callback_url = str(body["callback_url"])
            if body["currency"] != carrier.currency or amount <= 0:
                raise ValueError("amount or currency")
        except (ValueError, KeyError, TypeError, InvalidOperation) as exc:
            return web.json_response({"error": "invalid_request", "message": str(exc)}, status=400)
        existing = self.by_order.get((carrier.carrier_id, kind, order_id))
        if existing is not None:
            return web.json_response(self._ack(self.payments[existing]), status=202)
        original = self.payments.get(str(body.get("payment_id"))) if kind == "refund" else None
        msisdn = original.msisdn if original else str(body.get("msisdn", ""))
        fault = self.core.take_fault(carrier.carrier_id, msisdn)
        fault_kind = fault.kind if fault else ""
        refusal = await refuse_before_debit(fault, lambda: web.Response(status=202, text="OK"))
        if refusal is not None:
            return refusal

        payment = self._process(carrier, kind, order_id, msisdn, amount, original,
                                fault_kind == "insufficient_funds")
        copies = {"no_callback": 0, "duplicate_callback": 2}.get(fault_kind, 1)
        for _ in range(copies):
            task = asyncio.create_task(self._call_back(carrier, callback_url, payment))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await lose_answer_after_debit(request, fault)
        return web.json_response(self._ack(payment), status=202)

    @staticmethod
    def _ack(payment: Payment) -> dict[str, Any]:
        id_field = "payment_id" if payment.kind == "charge" else "refund_id"
        return {id_field: payment.reference, "order_id": payment.order_id, "status": "accepted"}

    def _process(self, carrier: SimCarrier, kind: str, order_id: str, msisdn: str,
                 amount: Decimal, original: Payment | None, force_insufficient: bool) -> Payment:
        book = self.core.books[carrier.carrier_id]
        status, reason = "completed", None
        reference = f"{carrier.carrier_id}-cb-{next(self._ids):08d}"
        try:
            if force_insufficient:
                raise InsufficientFunds()
            if kind == "charge":
                reference = book.charge(msisdn, amount, order_id, "payment").server_reference
            else:
                if original is None:
                    raise RefundRefused("unknown payment")
                reference = book.refund(msisdn, amount, order_id, "refund",
                                        original.reference).server_reference
        except InsufficientFunds:
            status, reason = "failed", "insufficient_funds"
        except RefundRefused:
            status, reason = "failed", "refund_refused"
        payment = Payment(reference, carrier.carrier_id, kind, order_id, msisdn, amount,
                          carrier.currency, status, reason,
                          time.monotonic() + CALLBACK_DELAY_SECONDS)
        self.payments[reference] = payment
        self.by_order[(carrier.carrier_id, kind, order_id)] = reference
        return payment

    async def _call_back(self, carrier: SimCarrier, url: str, payment: Payment) -> None:
        await asyncio.sleep(CALLBACK_DELAY_SECONDS)
        body = json.dumps(payment.view()).encode()
        signature = callback_signature(carrier.callback_secret, body)
        await post_callback(url, body, {"X-Callback-Signature": signature})
