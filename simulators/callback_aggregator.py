"""Aggregator with callbacks: requests are acknowledged (202), results are POSTed back later,
signed with HMAC-SHA256; on request it repeats a callback or never sends it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict, dataclass
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
    TakenFault,
    deliver,
    lookup_absent,
    lose_answer_after_debit,
    post_callback,
    refuse_before_debit,
    retarget,
    wrong_key,
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
    ready_at: float  # wall-clock time, so that it means the same after a restart
    callback_url: str = ""
    visible_at: float = 0.0  # before this, look-ups do not see it (commit_after_reply)

    def view(self) -> dict[str, Any]:
        done = time.time() >= self.ready_at
        id_field = "payment_id" if self.kind == "charge" else "refund_id"
        return {id_field: self.reference, "order_id": self.order_id,
                "status": self.status if done else "pending",
                "reason": self.reason if done else None,
                "amount": str(self.amount), "currency": self.currency}

    def final_view(self) -> dict[str, Any]:
        return self.view() | {"status": self.status, "reason": self.reason}

    def record(self) -> dict[str, Any]:
        return asdict(self) | {"amount": str(self.amount)}

    def visible(self) -> bool:
        return time.time() >= self.visible_at


def result_view(kind: str, reference: str, order_id: str, outcome: str, amount: Decimal | str,
                currency: str) -> dict[str, Any]:
    """A callback body saying `outcome` (success | insufficient_funds | failed)."""
    id_field = "payment_id" if kind == "charge" else "refund_id"
    status, reason = {"success": ("completed", None),
                      "insufficient_funds": ("failed", "insufficient_funds")}.get(
        outcome, ("failed", "refund_refused" if kind == "refund" else "declined"))
    return {id_field: reference, "order_id": order_id, "status": status, "reason": reason,
            "amount": str(amount), "currency": currency}


class CallbackAggregator:
    def __init__(self, core: SimulatorCore) -> None:
        self.core = core
        self.payments: dict[str, Payment] = {}
        self.by_order: dict[tuple[str, str, str], list[str]] = {}
        self._public_keys: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        core.reset_hooks.append(self._forget)
        core.callback_senders[PROTOCOL] = self.send_on_demand
        for record in core.records(PROTOCOL):
            self._index(Payment(**(record | {"amount": Decimal(record["amount"])})))

    def _forget(self) -> None:
        self.payments.clear()
        self.by_order.clear()

    def _index(self, payment: Payment) -> None:
        self.payments[payment.reference] = payment
        self.by_order.setdefault((payment.carrier_id, payment.kind, payment.order_id),
                                 []).append(payment.reference)

    def _find(self, carrier_id: str, kind: str, order_id: str) -> Payment | None:
        return next((self.payments[r] for r in self.by_order.get((carrier_id, kind, order_id), ())
                     if self.payments[r].visible()), None)

    def add_routes(self, app: web.Application) -> None:
        for path, kind in (("payments", "charge"), ("refunds", "refund")):
            app.router.add_post(f"/{{carrier}}/api/{path}", self._submit_for(kind))
            app.router.add_get(f"/{{carrier}}/api/{path}", self._find_for(kind))

    def _public_key(self, carrier: SimCarrier) -> Any:
        if carrier.password not in self._public_keys:  # by key: credentials may be rotated
            private = serialization.load_pem_private_key(carrier.password.encode(), None)
            self._public_keys[carrier.password] = private.public_key()
        return self._public_keys[carrier.password]

    async def _verified(self, request: web.Request) -> tuple[SimCarrier, bytes]:
        carrier = self.core.carrier(request, PROTOCOL)
        body = await request.read()
        header = request.headers.get("Authorization", "")
        try:
            claims = jwt.decode(header.removeprefix("Bearer "), self._public_key(carrier),
                                algorithms=["RS256"], options={"require": ["exp", "iat", "iss"]})
        except (jwt.PyJWTError, ValueError, TypeError):
            raise web.HTTPUnauthorized(text='{"error": "invalid_token"}',
                                       content_type="application/json") from None
        if claims.get("iss") != carrier.username or claims.get(
                "body_sha256") != hashlib.sha256(body).hexdigest():
            raise web.HTTPUnauthorized(text='{"error": "invalid_token"}',
                                       content_type="application/json")
        return carrier, body

    def _find_for(self, kind: str):  # type: ignore[no-untyped-def]
        async def find(request: web.Request) -> web.Response:
            carrier = self.core.carrier(request, PROTOCOL)
            if not carrier.status_lookup:
                return lookup_absent()
            carrier, _ = await self._verified(request)
            fault = self.core.take_lookup_fault(carrier.carrier_id)
            if fault is not None and fault.status == 401:
                return web.json_response({"error": "invalid_token"}, status=401)
            if fault is not None:
                return web.json_response({"error": "internal_error"}, status=fault.status or 500)
            payment = self._find(carrier.carrier_id, kind, request.query.get("order_id", ""))
            if payment is None:
                return web.json_response({"error": "not_found"}, status=404)
            return web.json_response(payment.view())
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
        existing = self._find(carrier.carrier_id, kind, order_id)
        if existing is not None and carrier.deduplicates_by_key == "error":
            return web.json_response({"error": "duplicate_order_id",
                                      "message": f"order_id {order_id} already used"}, status=409)
        if existing is not None and carrier.deduplicates_by_key == "replay":
            return web.json_response(self._ack(existing), status=202)
        original = self.payments.get(str(body.get("payment_id"))) if kind == "refund" else None
        msisdn = original.msisdn if original else str(body.get("msisdn", ""))
        fault = self.core.take_fault(carrier.carrier_id, msisdn)
        refusal = await refuse_before_debit(fault, lambda: web.Response(status=202, text="OK"))
        if refusal is not None:
            return refusal

        payment = self._process(carrier, kind, order_id, msisdn, amount, original, callback_url,
                                fault)
        self._schedule_callbacks(carrier, payment, fault)
        await lose_answer_after_debit(request, fault)
        return web.json_response(self._ack(payment), status=202)

    def _schedule_callbacks(self, carrier: SimCarrier, payment: Payment,
                            fault: TakenFault | None) -> None:
        kind = fault.kind if fault else ""
        url, secret, delay = payment.callback_url, carrier.callback_secret, CALLBACK_DELAY_SECONDS
        body = payment.final_view()
        if kind == "late_callback" and fault:
            delay = max(fault.delay, CALLBACK_DELAY_SECONDS)
        if kind == "forged_callback":  # someone else's, first: the opposite result, wrong key
            forged = result_view(payment.kind, payment.reference, payment.order_id,
                                 "insufficient_funds" if payment.status == "completed"
                                 else "success", payment.amount, payment.currency)
            self._later(url, forged, wrong_key(), CALLBACK_DELAY_SECONDS / 2)
        if kind == "foreign_callback":  # the true result, to another carrier's URL and key
            other = self.core.other_carrier(carrier)
            if other is not None:
                url, secret = retarget(url, carrier.carrier_id, other.carrier_id), \
                    other.callback_secret
        copies = {"no_callback": 0, "duplicate_callback": 2}.get(kind, 1)
        for _ in range(copies):
            self._later(url, body, secret, delay)

    def _later(self, url: str, body: dict[str, Any], secret: str, delay: float) -> None:
        task = asyncio.create_task(self._call_back(url, body, secret, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _ack(payment: Payment) -> dict[str, Any]:
        id_field = "payment_id" if payment.kind == "charge" else "refund_id"
        return {id_field: payment.reference, "order_id": payment.order_id, "status": "accepted"}

    def _process(self, carrier: SimCarrier, kind: str, order_id: str, msisdn: str,
                 amount: Decimal, original: Payment | None, callback_url: str,
                 fault: TakenFault | None) -> Payment:
        book = self.core.books[carrier.carrier_id]
        fault_kind = fault.kind if fault else ""
        visible_at = fault.visible_at() if fault else 0.0
        with self.core.atomic():  # the debit and our record of it, in one commit
            status, reason = "completed", None
            reference = f"{carrier.carrier_id}-cb-{self.core.next_id(PROTOCOL):08d}"
            try:
                if fault_kind == "insufficient_funds":
                    raise InsufficientFunds()
                if fault_kind == "fault_code_variant":
                    status, reason = "failed", (fault.code if fault and fault.code
                                                else "balance_too_low")
                elif kind == "charge":
                    reference = book.charge(msisdn, amount, order_id, "payment",
                                            visible_at).server_reference
                else:
                    if original is None:
                        raise RefundRefused("unknown payment")
                    reference = book.refund(msisdn, amount, order_id, "refund",
                                            original.reference, visible_at).server_reference
            except InsufficientFunds:
                status, reason = "failed", "insufficient_funds"
            except RefundRefused:
                status, reason = "failed", "refund_refused"
            payment = Payment(reference, carrier.carrier_id, kind, order_id, msisdn, amount,
                              carrier.currency, status, reason,
                              time.time() + CALLBACK_DELAY_SECONDS, callback_url, visible_at)
            self.core.save_record(PROTOCOL, reference, payment.record())
        self._index(payment)
        return payment

    async def _call_back(self, url: str, view: dict[str, Any], secret: str,
                         delay: float) -> None:
        await asyncio.sleep(delay)
        body = json.dumps(view).encode()
        await post_callback(url, body, {"X-Callback-Signature": callback_signature(secret, body)})

    async def send_on_demand(self, carrier: SimCarrier, request: dict[str, Any]) -> dict[str, Any]:
        """/_control/callback: one callback now, saying what the request asks."""
        key = str(request["key"])
        payment = next((self.payments[r] for kind in ("charge", "refund")
                        for r in self.by_order.get((carrier.carrier_id, kind, key), ())), None)
        known_url = payment.callback_url if payment else next(
            (p.callback_url for p in reversed(self.payments.values())
             if p.carrier_id == carrier.carrier_id), None)
        url, secret = self.core.callback_target(carrier, request, known_url)
        view = result_view(payment.kind if payment else "charge",
                           payment.reference if payment else f"{carrier.carrier_id}-cb-forged",
                           key, str(request["outcome"]),
                           payment.amount if payment else str(request.get("amount", "1.00")),
                           carrier.currency)
        body = json.dumps(view).encode()
        status = await deliver(url, body, {"X-Callback-Signature": callback_signature(secret, body)})
        return {"url": url, "status": status, "body": view}
