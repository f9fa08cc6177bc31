"""CAMARA Carrier Billing operator: one-step and two-step payments, refunds, CloudEvents to the
client's sink; a repeated clientCorrelator is refused with 400."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from carriers.camara import sink_token
from simulators.books import InsufficientFunds, RefundRefused
from simulators.core import (
    SimCarrier,
    SimulatorCore,
    TakenFault,
    deliver,
    lookup_absent,
    lose_answer_after_debit,
    refuse_before_debit,
    retarget,
    wrong_key,
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
    visible_at: float = 0.0  # before this, look-ups do not see it (commit_after_reply)

    def visible(self) -> bool:
        return time.time() >= self.visible_at

    def record(self) -> dict[str, Any]:
        return asdict(self) | {"amount": str(self.amount)}

    def current_status(self) -> str:
        if self.final_status and time.time() >= self.ready_at:
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
        # (carrier, clientCorrelator) -> (payment id, refund id or "", visible from)
        self.correlators: dict[tuple[str, str], tuple[str, str, float]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        core.reset_hooks.append(self._forget)
        core.callback_senders[PROTOCOL] = self.send_on_demand
        for record in core.records(PROTOCOL):
            payment = Payment(**(record | {"amount": Decimal(record["amount"])}))
            self.payments[payment.payment_id] = payment
        for record in core.records(f"{PROTOCOL}-correlators"):
            self.correlators[(record["carrier_id"], record["key"])] = (
                record["payment_id"], record["refund_id"], record["visible_at"])

    def _forget(self) -> None:
        self.payments.clear()
        self.correlators.clear()

    def _save(self, payment: Payment) -> None:
        self.core.save_record(PROTOCOL, payment.payment_id, payment.record())

    def _used(self, carrier: SimCarrier, key: str) -> tuple[str, str] | None:
        """What a (visible) earlier use of this clientCorrelator created, if any."""
        used = self.correlators.get((carrier.carrier_id, key))
        return used[:2] if used is not None and time.time() >= used[2] else None

    def _use(self, carrier: SimCarrier, key: str, payment_id: str, refund_id: str,
             visible_at: float) -> None:
        if (carrier.carrier_id, key) in self.correlators:  # "no" deduplication: keep the first
            return
        self.correlators[(carrier.carrier_id, key)] = (payment_id, refund_id, visible_at)
        self.core.save_record(f"{PROTOCOL}-correlators", f"{carrier.carrier_id}\x1f{key}", {
            "carrier_id": carrier.carrier_id, "key": key, "payment_id": payment_id,
            "refund_id": refund_id, "visible_at": visible_at})

    def _duplicate(self, carrier: SimCarrier, key: str, correlator_header: str = ""
                   ) -> web.Response | None:
        """The answer to a repeated clientCorrelator, or None to go on (a new operation)."""
        used = self._used(carrier, key)
        if used is None or carrier.deduplicates_by_key == "no":
            return None
        if carrier.deduplicates_by_key == "error":
            return problem(409, "ALREADY_EXISTS", "clientCorrelator already used",
                           correlator_header)
        payment = self.payments[used[0]]
        if used[1]:
            refund = next((r for r in payment.refunds if r["refundId"] == used[1]), None)
            return web.json_response(refund, status=201)
        return web.json_response(payment.view() | {
            "amountTransaction": self._public(payment.transaction)}, status=201)

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
        if payment is None or payment.carrier_id != carrier.carrier_id or not payment.visible():
            raise web.HTTPNotFound(text=json.dumps(
                {"status": 404, "code": "NOT_FOUND", "message": "no such payment"}),
                content_type="application/json")
        return payment

    @staticmethod
    def _event(kind: str, data: dict[str, Any]) -> dict[str, Any]:
        return {"id": str(uuid.uuid4()), "source": "https://operator.example/carrier-billing",
                "type": f"org.camaraproject.{kind}", "specversion": "1.0",
                "datacontenttype": "application/json", "time": datetime.now(UTC).isoformat(),
                "data": data}

    def _notify(self, carrier: SimCarrier, body: dict[str, Any], kind: str, data: dict[str, Any],
                fault: TakenFault | None = None) -> None:
        sink = body.get("sink")
        token = str((body.get("sinkCredential") or {}).get("accessToken", ""))
        if not sink:
            return
        sink, fault_kind, delay = str(sink), fault.kind if fault else "", EVENT_DELAY_SECONDS
        if fault_kind == "late_callback" and fault:
            delay = max(fault.delay, EVENT_DELAY_SECONDS)
        if fault_kind == "forged_callback":  # someone else's, first: the opposite, wrong token
            self._later(sink, wrong_key(), self._opposite(kind, data), EVENT_DELAY_SECONDS / 2)
        if fault_kind == "foreign_callback":  # the truth, to another carrier's sink and token
            other = self.core.other_carrier(carrier)
            if other is not None:
                sink = retarget(sink, carrier.carrier_id, other.carrier_id)
                token = sink_token(other.callback_secret, sink.rsplit("/", 1)[-1])
        copies = {"no_callback": 0, "duplicate_callback": 2}.get(fault_kind, 1)
        event = self._event(kind, data)
        for _ in range(copies):
            self._later(sink, token, event, delay)

    def _opposite(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        if kind.endswith("payment-completed"):
            return self._event("carrier-billing.v0.payment-denied", {
                "paymentId": data.get("paymentId"), "status": "denied",
                "description": "payment denied", "denialReason": "insufficient balance"})
        return self._event("carrier-billing.v0.payment-completed", {
            "paymentId": data.get("paymentId"), "status": "succeeded",
            "description": "payment completed", "paymentDate": datetime.now(UTC).isoformat()})

    def _later(self, sink: str, token: str, event: dict[str, Any], delay: float) -> None:
        task = asyncio.create_task(self._deliver(sink, token, event, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _deliver(sink: str, token: str, event: dict[str, Any],
                       delay: float = EVENT_DELAY_SECONDS) -> int:
        await asyncio.sleep(delay)
        return await deliver(sink, json.dumps(event).encode(), {"Authorization": f"Bearer {token}"})

    async def send_on_demand(self, carrier: SimCarrier, request: dict[str, Any]) -> dict[str, Any]:
        """/_control/callback: one CloudEvent now, saying what the request asks."""
        key = str(request["key"])
        used = self.correlators.get((carrier.carrier_id, key))
        payment = self.payments.get(used[0]) if used else None
        known = (payment.transaction.get("_sink_url") if payment else None) or next(
            (p.transaction.get("_sink_url") for p in reversed(self.payments.values())
             if p.carrier_id == carrier.carrier_id and p.transaction.get("_sink_url")), None)
        if known and not payment:  # another key's sink: the key is the last path segment
            known = f"{str(known).rsplit('/', 1)[0]}/{key}"
        url, secret = self.core.callback_target(carrier, request, known)
        # a sink credential is per operation (carriers.camara.sink_token); "secret" is used as is
        token = str(request["secret"]) if request.get("secret") else sink_token(secret, key)
        payment_id = payment.payment_id if payment else f"{carrier.carrier_id}-pay-forged"
        kind = ("carrier-billing.v0.payment-completed" if request["outcome"] == "success"
                else "carrier-billing.v0.payment-denied")
        data: dict[str, Any] = {"paymentId": payment_id,
                                "status": "succeeded" if request["outcome"] == "success"
                                else "denied"}
        if request["outcome"] == "insufficient_funds":
            data["denialReason"] = "insufficient balance"
        elif request["outcome"] == "failed":
            data["denialReason"] = "payment refused"
        event = self._event(kind, data)
        status = await self._deliver(url, token, event, 0.0)
        return {"url": url, "status": status, "body": event}

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
        duplicate = self._duplicate(carrier, key, correlator_header)
        if duplicate is not None:
            return duplicate
        fault = self.core.take_fault(carrier.carrier_id, msisdn)
        refusal = await refuse_before_debit(
            fault, lambda: web.Response(status=201, text="{payment", content_type="application/json"))
        if refusal is not None:
            return refusal

        visible_at = fault.visible_at() if fault else 0.0
        payment = Payment(f"{carrier.carrier_id}-pay-{self.core.next_id(PROTOCOL):08d}",
                          carrier.carrier_id, msisdn, amount, dict(body["amountTransaction"]),
                          "processing", visible_at=visible_at)
        payment.transaction["_sink_url"] = body.get("sink")
        if two_step:
            payment.status = "pending_validation"
            payment.authorization_id = secrets.token_hex(6)
            payment.code = f"{secrets.randbelow(10**6):06d}"  # "sent" to the subscriber by SMS
            payment.transaction["_sink"] = body.get("sink")
            payment.transaction["_sinkCredential"] = body.get("sinkCredential")
            with self.core.atomic():
                self._use(carrier, key, payment.payment_id, "", visible_at)
                self._save(payment)
            self.payments[payment.payment_id] = payment
            reply = payment.view() | {"authorizationId": payment.authorization_id}
            reply["amountTransaction"] = self._public(payment.transaction)
            return web.json_response(reply, status=201)
        with self.core.atomic():  # the key, the debit and the payment: one commit
            self._use(carrier, key, payment.payment_id, "", visible_at)
            self._settle(carrier, payment, body, fault)
        self.payments[payment.payment_id] = payment
        await lose_answer_after_debit(request, fault)
        return web.json_response(payment.view(), status=201,
                                 headers={"x-correlator": correlator_header})

    @staticmethod
    def _public(transaction: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in transaction.items() if not k.startswith("_")}

    def _settle(self, carrier: SimCarrier, payment: Payment, body: dict[str, Any],
                fault: TakenFault | None) -> None:
        """Debits now; the outcome shows (and is notified) a moment later."""
        book = self.core.books[carrier.carrier_id]
        fault_kind = fault.kind if fault else ""
        try:
            if fault_kind in ("insufficient_funds", "fault_code_variant"):
                raise InsufficientFunds()
            txn = book.charge(payment.msisdn, payment.amount,
                              str(payment.transaction["clientCorrelator"]), payment.payment_id,
                              payment.visible_at)
            payment.book_reference = txn.server_reference
            payment.final_status, event = "succeeded", "payment-completed"
            data = {"paymentId": payment.payment_id, "status": "succeeded",
                    "description": "payment completed", "paymentDate": datetime.now(UTC).isoformat()}
        except InsufficientFunds:
            payment.final_status, event = "denied", "payment-denied"
            payment.denial_reason = "insufficient balance"
            if fault is not None and fault_kind == "fault_code_variant":
                payment.denial_reason = fault.text or fault.code or "credit limit reached"
            data = {"paymentId": payment.payment_id, "status": "denied",
                    "description": "payment denied", "denialReason": payment.denial_reason}
        payment.ready_at = time.time() + EVENT_DELAY_SECONDS
        self._save(payment)
        self._notify(carrier, body, f"carrier-billing.v0.{event}", data, fault)

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
        self._save(payment)
        return web.Response(status=204)

    async def confirm(self, request: web.Request) -> web.Response:
        carrier = self._authorised(request)
        payment = self._payment(request, carrier)
        if payment.current_status() != "reserved":
            return problem(409, "CARRIER_BILLING.PAYMENT_CONFIRMED",
                           f"payment is {payment.status}")
        sink = {"sink": payment.transaction.pop("_sink", None),
                "sinkCredential": payment.transaction.pop("_sinkCredential", None)}
        with self.core.atomic():
            self._settle(carrier, payment, sink, None)
            payment.ready_at = 0.0  # two-step confirmation answers synchronously
            self._save(payment)
        return web.json_response(payment.view())

    async def get_payment(self, request: web.Request) -> web.Response:
        carrier = self._authorised(request)
        return web.json_response(self._payment(request, carrier).view())

    async def list_payments(self, request: web.Request) -> web.Response:
        """retrievePayments: how a client finds its payment by clientCorrelator."""
        carrier = self.core.carrier(request, PROTOCOL)
        if not carrier.status_lookup:
            return lookup_absent()
        carrier = self._authorised(request)
        fault = self.core.take_lookup_fault(carrier.carrier_id)
        if fault is not None and fault.status == 401:
            return problem(401, "UNAUTHENTICATED", "invalid token")
        if fault is not None:
            return problem(fault.status or 500, "INTERNAL", "server error")
        page, per_page = int(request.query.get("page", "1")), int(request.query.get("perPage", "20"))
        since = request.query.get("paymentCreationDate.gte", "")
        mine = [p for p in self.payments.values()
                if p.carrier_id == carrier.carrier_id and p.created >= since and p.visible()]
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
        duplicate = self._duplicate(carrier, key)
        if duplicate is not None:
            return duplicate
        fault = self.core.take_fault(carrier.carrier_id, payment.msisdn)
        refusal = await refuse_before_debit(
            fault, lambda: web.Response(status=201, text="{refund", content_type="application/json"))
        if refusal is not None:
            return refusal
        visible_at = fault.visible_at() if fault else 0.0
        refund: dict[str, Any] = {"refundId": f"{payment.payment_id}-r{len(payment.refunds) + 1}",
                  "refundStatus": "succeeded", "type": body.get("type", "total"),
                  "refundCreationDate": datetime.now(UTC).isoformat(),
                  "amountTransaction": transaction}
        with self.core.atomic():  # the key, the credit and the refund record: one commit
            try:
                if payment.book_reference is None:
                    raise RefundRefused("payment not charged")
                self.core.books[carrier.carrier_id].refund(
                    payment.msisdn, amount, key, "refund", payment.book_reference, visible_at)
                event = "refund-completed"
            except RefundRefused as exc:
                refund["refundStatus"], refund["denialReason"] = "denied", str(exc)
                event = "refund-denied"
            self._use(carrier, key, payment.payment_id, str(refund["refundId"]), visible_at)
            payment.refunds.append(refund)
            self._save(payment)
        self._notify(carrier, body, f"carrier-billing-refund.v0.{event}",
                     {"paymentId": payment.payment_id, "refundId": refund["refundId"],
                      "status": refund["refundStatus"], "description": event}, fault)
        await lose_answer_after_debit(request, fault)
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
