"""CAMARA Carrier Billing operator (and the Carrier Billing Refund API, at its own base path):
one-step and two-step payments (prepare → validate → confirm or cancel), refunds, look-ups,
CloudEvents to the client's sink. Checked against CAMARA's Gherkin test definitions
(tests/camara_bdd): input validation before any debit, the standard error body on every
refusal, x-correlator checked and echoed, scopes per operation, 3-legged tokens.

A repeated clientCorrelator is refused: 400 while its payment (or refund) is not completed, 409
once it is (or replayed, per the carrier's promise); a referenceCode of a live payment or
refund is 409.

The "testing assets" the feature files ask an operator for are per-carrier policy
(/_control/camara/policy): numbers business rules deny, numbers whose one-step payments and
refunds stay processing ("pending"), whose refunds end denied ("refund_failing") or are refused
("refund_denied", "not_refundable"), amount limits and thresholds, a rate limit. Without a
policy every payment and refund completes at once, as the adapter's tests expect."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from carriers.camara import LOOPBACK_HOSTS, sink_token
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
REFUND_BASE = "/{carrier}/camara/carrier-billing-refund/v0"
PHONE = re.compile(r"^\+[1-9][0-9]{4,14}$")
CORRELATOR = re.compile(r"^[a-zA-Z0-9-_:;./<>{}]{0,256}$")
CURRENCY = re.compile(r"^[A-Z]{3}$")
PAYMENT_STATUSES = ("processing", "pending_validation", "denied", "reserved", "succeeded",
                    "cancelled")
REFUND_STATUSES = ("processing", "denied", "succeeded")
LIVE = ("processing", "pending_validation", "reserved", "succeeded")
MAX_PER_PAGE = 100
MAX_VALIDATION_ATTEMPTS = 3
CREATE, READ, WRITE = ("carrier-billing:payments:create", "carrier-billing:payments:read",
                       "carrier-billing:payments:write")
REFUND_CREATE, REFUND_READ = ("carrier-billing-refund:refunds:create",
                              "carrier-billing-refund:refunds:read")


class Problem(Exception):
    """A refusal in the spec's ErrorInfo shape."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> web.Response:
        return web.json_response({"status": self.status, "code": self.code,
                                  "message": self.message}, status=self.status,
                                 headers=self.headers)


def problem(status: int, code: str, message: str, correlator: str = "") -> web.Response:
    return web.json_response({"status": status, "code": code, "message": message}, status=status,
                             headers={"x-correlator": correlator} if correlator else None)


def bad(message: str, code: str = "INVALID_ARGUMENT") -> Problem:
    return Problem(400, code, message)


def parse_when(value: str, name: str) -> datetime:
    """An RFC 3339 date-time with a zone (compared as a moment, never as text)."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise bad(f"{name} is not an RFC 3339 date-time") from None
    if moment.tzinfo is None:
        raise bad(f"{name} must have a time zone")
    return moment


def _number(value: Any, name: str, minimum: Decimal) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise bad(f"{name} must be a number")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise bad(f"{name} must be a number") from None
    if not amount.is_finite() or amount < minimum or amount != amount.quantize(Decimal("0.001")):
        raise bad(f"{name} must be at least {minimum} in steps of 0.001")
    return amount


def _dig(body: Any, *path: str) -> Any:
    for key in path:
        body = body.get(key) if isinstance(body, dict) else None
    return body


@dataclass
class Grant:
    """What an access token allows: its scopes (None: all) and the phone number it was issued
    for (3-legged), if any. Tokens from the ordinary token endpoint are 2-legged, all scopes."""
    scopes: frozenset[str] | None = None
    phone: str | None = None


@dataclass
class Policy:
    """Per-carrier operator rules a test or the demo sets (/_control/camara/policy)."""
    number_prefixes: list[str] = field(default_factory=list)  # empty: every number is ours
    denied: set[str] = field(default_factory=set)  # numbers business rules refuse (403)
    not_applicable: set[str] = field(default_factory=set)  # numbers without the service
    # numbers whose one-step payments and refunds stay "processing": the billing back end has
    # not answered yet, nothing has moved (the spec's asynchronous operator)
    pending: set[str] = field(default_factory=set)
    refund_denied: set[str] = field(default_factory=set)  # refunds refused by business (403)
    refund_failing: set[str] = field(default_factory=set)  # refunds accepted, then denied
    not_refundable: set[str] = field(default_factory=set)  # payments not eligible (403)
    max_amount: Decimal | None = None
    threshold_amount: Decimal | None = None
    max_refund_amount: Decimal | None = None
    refund_threshold_amount: Decimal | None = None  # refunds a number may accumulate
    rate_limit: int | None = None  # requests per second
    seen: deque[float] = field(default_factory=deque)


@dataclass
class Call:
    carrier: SimCarrier
    grant: Grant
    correlator: str


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
    payment_date: str | None = None
    validation_attempts: int = 0

    def visible(self) -> bool:
        return time.time() >= self.visible_at

    def record(self) -> dict[str, Any]:
        return asdict(self) | {"amount": str(self.amount)}

    def current_status(self) -> str:
        if self.final_status and time.time() >= self.ready_at:
            self.status, self.final_status = self.final_status, None
        return self.status

    def created_at(self) -> datetime:
        return parse_when(self.created, "paymentCreationDate")

    def view(self) -> dict[str, Any]:
        """What the operator shows of a payment: never the sink or its credential."""
        status = self.current_status()
        view: dict[str, Any] = {
            "paymentId": self.payment_id, "paymentStatus": status,
            "amountTransaction": {k: v for k, v in self.transaction.items()
                                  if not k.startswith("_")},
            "paymentCreationDate": self.created}
        if status == "succeeded" and self.payment_date:
            view["paymentDate"] = self.payment_date
        if status == "denied" and self.denial_reason:
            view["denialReason"] = self.denial_reason
        return view

    def refunded(self, statuses: tuple[str, ...] = ("processing", "succeeded")) -> Decimal:
        return sum((Decimal(str(r["_amount"])) for r in self.refunds
                    if r["refundStatus"] in statuses), Decimal(0))


def refund_view(refund: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in refund.items() if not k.startswith("_")}


Handler = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]


class CamaraOperator:
    def __init__(self, core: SimulatorCore) -> None:
        self.core = core
        self.payments: dict[str, Payment] = {}
        # (carrier, clientCorrelator) -> (payment id, refund id or "", visible from)
        self.correlators: dict[tuple[str, str], tuple[str, str, float]] = {}
        self.grants: dict[str, Grant] = {}
        self.policies: dict[str, Policy] = {}
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
        self.grants.clear()
        self.policies.clear()

    def _save(self, payment: Payment) -> None:
        self.core.save_record(PROTOCOL, payment.payment_id, payment.record())

    def policy(self, carrier_id: str) -> Policy:
        return self.policies.setdefault(carrier_id, Policy())

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

    def _duplicate(self, carrier: SimCarrier, key: str) -> web.Response | None:
        """The answer to a repeated clientCorrelator, or None to go on (a new operation)."""
        used = self._used(carrier, key)
        if used is None or carrier.deduplicates_by_key == "no":
            return None
        payment = self.payments[used[0]]
        if carrier.deduplicates_by_key == "error":
            if not used[1] and payment.book_reference is None and payment.current_status() in LIVE:
                raise bad("clientCorrelator already in use by a payment not completed")
            if used[1] and any(r["refundId"] == used[1] and r["refundStatus"] == "processing"
                               for r in payment.refunds):
                raise bad("clientCorrelator already in use by a refund not completed")
            raise Problem(409, "ALREADY_EXISTS", "clientCorrelator already used")
        if used[1]:
            refund = next((r for r in payment.refunds if r["refundId"] == used[1]), None)
            return web.json_response(refund_view(refund or {}), status=201)
        return web.json_response(payment.view(), status=201)

    # -- the frame of every API call ---------------------------------------------------------

    def _api(self, scope: str, handler: Handler) -> Callable[[web.Request], Awaitable[
            web.StreamResponse]]:
        """Availability, authentication (401), x-correlator (400), scope (403), rate (429),
        then the handler; every refusal has the ErrorInfo body, every answer the correlator."""
        async def endpoint(request: web.Request) -> web.StreamResponse:
            correlator = request.headers.get("x-correlator")
            valid = correlator is not None and CORRELATOR.fullmatch(correlator) is not None
            response: web.StreamResponse
            try:
                try:
                    carrier = self.core.carrier(request, PROTOCOL)
                except web.HTTPServiceUnavailable:
                    raise Problem(503, "UNAVAILABLE", "service unavailable",
                                  {"Retry-After": "1"}) from None
                grant = self._grant(request, carrier)
                if correlator is not None and not valid:
                    raise bad("x-correlator does not comply with its schema")
                if grant.scopes is not None and scope not in grant.scopes:
                    raise Problem(403, "PERMISSION_DENIED", f"the token lacks scope {scope}")
                self._throttle(carrier)
                response = await handler(request, Call(carrier, grant, correlator or ""))
            except Problem as refused:
                response = refused.response()
            if valid and correlator is not None:
                response.headers["x-correlator"] = correlator
            return response
        return endpoint

    def _grant(self, request: web.Request, carrier: SimCarrier) -> Grant:
        header = request.headers.get("Authorization", "")
        if not self.core.bearer_ok(header, carrier):
            raise Problem(401, "UNAUTHENTICATED", "a valid access token is required")
        return self.grants.get(header.removeprefix("Bearer "), Grant())

    def _throttle(self, carrier: SimCarrier) -> None:
        policy = self.policy(carrier.carrier_id)
        if policy.rate_limit is None:
            return
        now = time.time()
        while policy.seen and policy.seen[0] < now - 1:
            policy.seen.popleft()
        if len(policy.seen) >= policy.rate_limit:
            raise Problem(429, "TOO_MANY_REQUESTS", "rate limit reached", {"Retry-After": "1"})
        policy.seen.append(now)

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        text = await request.text()
        if not text.strip():
            raise bad("a request body is required")
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            raise bad("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise bad("the request body must be an object")
        return body

    def _subscriber(self, call: Call, given: Any) -> str | None:
        """The phone number a request is about: from the 3-legged token, or from the body with
        a 2-legged one. None: neither (the caller decides whether that is an error)."""
        if given is not None and (not isinstance(given, str) or not PHONE.fullmatch(given)):
            raise bad("phoneNumber does not comply with the schema")
        if call.grant.phone:
            if given is not None and given != call.grant.phone:
                raise Problem(422, "UNNECESSARY_IDENTIFIER",
                              "the phone number is already identified by the access token")
            return call.grant.phone
        if given is None:
            return None
        policy = self.policy(call.carrier.carrier_id)
        if policy.number_prefixes and not given.startswith(tuple(policy.number_prefixes)):
            raise Problem(404, "IDENTIFIER_NOT_FOUND", "the phone number is not ours")
        if given in policy.not_applicable:
            raise Problem(422, "SERVICE_NOT_APPLICABLE", "the service is not available for "
                          "this phone number")
        return given

    @staticmethod
    def _check_sink(body: dict[str, Any]) -> None:
        """sink and sinkCredential, checked before anything else happens."""
        sink = body.get("sink")
        if sink is not None:
            if not isinstance(sink, str):
                raise bad("sink must be a URL")
            parts = urlsplit(sink)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise bad("sink is not a URL", "INVALID_SINK")
            if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
                raise bad("sink must be an https URL", "INVALID_SINK")
        credential = body.get("sinkCredential")
        if credential is None:
            return
        kind = credential.get("credentialType") if isinstance(credential, dict) else None
        if not isinstance(credential, dict) or kind not in ("PLAIN", "ACCESSTOKEN",
                                                            "REFRESHTOKEN"):
            raise bad("sinkCredential does not comply with the schema")
        if kind != "ACCESSTOKEN":
            raise bad("only ACCESSTOKEN sink credentials are supported", "INVALID_CREDENTIAL")
        if credential.get("accessTokenType") != "bearer":
            raise bad("only bearer access tokens are supported", "INVALID_TOKEN")
        token, expires = credential.get("accessToken"), credential.get("accessTokenExpiresUtc")
        if not isinstance(token, str) or not token:
            raise bad("sinkCredential.accessToken is required", "INVALID_CREDENTIAL")
        if expires is not None:
            try:
                moment = parse_when(str(expires), "accessTokenExpiresUtc")
            except Problem:
                raise bad("accessTokenExpiresUtc is not a date-time with a zone",
                          "INVALID_CREDENTIAL") from None
            if moment <= datetime.now(UTC):
                raise bad("the sink credential has expired", "INVALID_CREDENTIAL")

    def _charging(self, carrier: SimCarrier, info: Any, name: str) -> Decimal:
        if not isinstance(info, dict):
            raise bad(f"{name}.chargingInformation is required")
        amount = _number(info.get("amount"), "amount", Decimal("0.001"))
        currency = info.get("currency")
        if not isinstance(currency, str) or not CURRENCY.fullmatch(currency):
            raise bad("currency must be an ISO 4217 code")
        if currency != carrier.currency:
            raise bad(f"currency {currency} is not accepted: {carrier.currency} only")
        if not isinstance(info.get("description"), str) or not info["description"]:
            raise bad("description is required")
        if "isTaxIncluded" in info and not isinstance(info["isTaxIncluded"], bool):
            raise bad("isTaxIncluded must be a boolean")
        if "taxAmount" in info:
            _number(info["taxAmount"], "taxAmount", Decimal(0))
        return amount

    def add_routes(self, app: web.Application) -> None:
        route = app.router
        route.add_post(f"{BASE}/payments", self._api(CREATE, self.create))
        route.add_get(f"{BASE}/payments", self._api(READ, self.list_payments))
        route.add_post(f"{BASE}/payments/prepare", self._api(CREATE, self.prepare))
        route.add_get(f"{BASE}/payments/{{payment_id}}", self._api(READ, self.get_payment))
        route.add_post(f"{BASE}/payments/{{payment_id}}/validate",
                       self._api(WRITE, self.validate))
        route.add_post(f"{BASE}/payments/{{payment_id}}/confirm", self._api(WRITE, self.confirm))
        route.add_post(f"{BASE}/payments/{{payment_id}}/cancel", self._api(WRITE, self.cancel))
        # the refund API lives at its own base; the older path under the payments API stays
        for base in (REFUND_BASE, BASE):
            route.add_get(f"{base}/payments/{{payment_id}}/refunds/remaining-amount",
                          self._api(REFUND_READ, self.remaining_amount))
            route.add_post(f"{base}/payments/{{payment_id}}/refunds",
                           self._api(REFUND_CREATE, self.create_refund))
            route.add_get(f"{base}/payments/{{payment_id}}/refunds",
                          self._api(REFUND_READ, self.list_refunds))
            route.add_get(f"{base}/payments/{{payment_id}}/refunds/{{refund_id}}",
                          self._api(REFUND_READ, self.get_refund))
        route.add_get("/_control/camara/otp", self.otp)
        route.add_post("/_control/camara/token", self.issue_token)
        route.add_post("/_control/camara/policy", self.set_policy)
        route.add_post("/_control/camara/backdate", self.backdate)

    def _payment(self, request: web.Request, call: Call) -> Payment:
        payment = self.payments.get(request.match_info["payment_id"])
        if payment is None or payment.carrier_id != call.carrier.carrier_id or (
                call.grant.phone and payment.msisdn != call.grant.phone):
            raise Problem(404, "NOT_FOUND", "no such payment")
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
                "paymentId": data.get("paymentId"), "status": "failed",
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
        return await deliver(sink, json.dumps(event).encode(), {
            "Content-Type": "application/cloudevents+json", "Authorization": f"Bearer {token}"})

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
                                else "failed"}
        if request["outcome"] == "insufficient_funds":
            data["denialReason"] = "insufficient balance"
        elif request["outcome"] == "failed":
            data["denialReason"] = "payment refused"
        event = self._event(kind, data)
        status = await self._deliver(url, token, event, 0.0)
        return {"url": url, "status": status, "body": event}


    async def _refuse(self, fault: TakenFault | None, malformed: str) -> web.Response | None:
        """Faults before any money moves, with the spec's error body where it has one."""
        if fault is not None and fault.kind == "error_503":
            return Problem(503, "UNAVAILABLE", "service unavailable", {"Retry-After": "1"}
                           ).response()
        if fault is not None and fault.kind == "throttle":
            return Problem(429, "TOO_MANY_REQUESTS", "too many requests",
                           {"Retry-After": str(int(fault.delay) or 1)}).response()
        if fault is not None and fault.kind == "error_500":
            return Problem(500, "INTERNAL", "internal error").response()
        return await refuse_before_debit(
            fault, lambda: web.Response(status=201, text=malformed,
                                        content_type="application/json"))

    def _read_payment(self, call: Call, body: dict[str, Any]) -> tuple[
            dict[str, Any], Decimal, str | None, str]:
        transaction = body.get("amountTransaction")
        if not isinstance(transaction, dict):
            raise bad("amountTransaction is required")
        if not isinstance(transaction.get("paymentAmount"), dict):
            raise bad("amountTransaction.paymentAmount is required")
        amount = self._charging(call.carrier, transaction["paymentAmount"].get(
            "chargingInformation"), "paymentAmount")
        if not isinstance(transaction.get("referenceCode"), str) or not transaction[
                "referenceCode"]:
            raise bad("amountTransaction.referenceCode is required")
        key = transaction.get("clientCorrelator")
        if key is not None and not isinstance(key, str):
            raise bad("clientCorrelator must be a string")
        self._check_sink(body)
        msisdn = self._subscriber(call, transaction.get("phoneNumber"))
        if msisdn is None:
            raise Problem(422, "MISSING_IDENTIFIER", "the phone number is required: the access "
                          "token does not identify one")
        return transaction, amount, key, msisdn

    def _business_rules(self, carrier: SimCarrier, msisdn: str, amount: Decimal) -> None:
        policy = self.policy(carrier.carrier_id)
        if msisdn in policy.denied:
            raise Problem(403, "CARRIER_BILLING.PAYMENT_DENIED", "payment denied by business "
                          "rules")
        if policy.max_amount is not None and amount > policy.max_amount:
            raise Problem(422, "CARRIER_BILLING.UNAUTHORIZED_AMOUNT", "amount exceeds the "
                          "regulated maximum")
        if policy.threshold_amount is not None:
            spent = sum((p.amount for p in self.payments.values()
                         if p.carrier_id == carrier.carrier_id and p.msisdn == msisdn
                         and p.current_status() in LIVE), Decimal(0))
            if spent + amount > policy.threshold_amount:
                raise Problem(422, "CARRIER_BILLING.AMOUNT_THRESHOLD_OVERPASSED",
                              "amount exceeds the accumulated threshold")

    async def _start(self, request: web.Request, call: Call, two_step: bool
                     ) -> web.StreamResponse:
        carrier = call.carrier
        body = await self._body(request)
        transaction, amount, key, msisdn = self._read_payment(call, body)
        if key is not None:
            duplicate = self._duplicate(carrier, key)
            if duplicate is not None:
                return duplicate
        reference = transaction["referenceCode"]
        # without a clientCorrelator, the referenceCode of a live payment is what tells a repeat
        if key is None and any(p.carrier_id == carrier.carrier_id and p.visible()
               and p.transaction.get("referenceCode") == reference
               and p.current_status() in LIVE for p in self.payments.values()):
            raise Problem(409, "ALREADY_EXISTS", "a payment with this referenceCode exists")
        self._business_rules(carrier, msisdn, amount)
        fault = self.core.take_fault(carrier.carrier_id, msisdn)
        refusal = await self._refuse(fault, "{payment")
        if refusal is not None:
            return refusal

        visible_at = fault.visible_at() if fault else 0.0
        payment = Payment(f"{carrier.carrier_id}-pay-{self.core.next_id(PROTOCOL):08d}",
                          carrier.carrier_id, msisdn, amount, dict(transaction),
                          "processing", visible_at=visible_at)
        payment.transaction["_sink_url"] = body.get("sink")
        key = key or payment.payment_id
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
            return web.json_response(payment.view() | {"validationInfo": {
                "action": "validate", "authorizationId": payment.authorization_id}}, status=201)
        if msisdn in self.policy(carrier.carrier_id).pending:
            # the billing back end has not answered: processing, nothing debited, no event yet
            with self.core.atomic():
                self._use(carrier, key, payment.payment_id, "", visible_at)
                self._save(payment)
            self.payments[payment.payment_id] = payment
            return web.json_response(payment.view(), status=201)
        with self.core.atomic():  # the key, the debit and the payment: one commit
            self._use(carrier, key, payment.payment_id, "", visible_at)
            self._settle(carrier, payment, body, fault)
        self.payments[payment.payment_id] = payment
        await lose_answer_after_debit(request, fault)
        return web.json_response(payment.view(), status=201)

    def _settle(self, carrier: SimCarrier, payment: Payment, body: dict[str, Any],
                fault: TakenFault | None) -> None:
        """Debits now; the outcome shows (and is notified) a moment later."""
        book = self.core.books[carrier.carrier_id]
        fault_kind = fault.kind if fault else ""
        try:
            if fault_kind in ("insufficient_funds", "fault_code_variant"):
                raise InsufficientFunds()
            txn = book.charge(payment.msisdn, payment.amount,
                              str(payment.transaction.get("clientCorrelator")
                                  or payment.payment_id), payment.payment_id,
                              payment.visible_at)
            payment.book_reference = txn.server_reference
            payment.payment_date = datetime.now(UTC).isoformat()
            payment.final_status, event = "succeeded", "payment-completed"
            data = {"paymentId": payment.payment_id, "status": "succeeded",
                    "description": "payment completed", "paymentDate": payment.payment_date}
        except InsufficientFunds:
            payment.final_status, event = "denied", "payment-denied"
            payment.denial_reason = "insufficient balance"
            if fault is not None and fault_kind == "fault_code_variant":
                payment.denial_reason = fault.text or fault.code or "credit limit reached"
            data = {"paymentId": payment.payment_id, "status": "failed",
                    "description": "payment denied", "denialReason": payment.denial_reason}
        payment.ready_at = time.time() + EVENT_DELAY_SECONDS
        self._save(payment)
        self._notify(carrier, body, f"carrier-billing.v0.{event}", data, fault)

    # -- endpoints -----------------------------------------------------------------------------

    async def create(self, request: web.Request, call: Call) -> web.StreamResponse:
        return await self._start(request, call, two_step=False)

    async def prepare(self, request: web.Request, call: Call) -> web.StreamResponse:
        return await self._start(request, call, two_step=True)

    @staticmethod
    def _not_open(payment: Payment) -> Problem:
        if payment.current_status() == "cancelled":
            return Problem(409, "CARRIER_BILLING.PAYMENT_CANCELLED", "payment is cancelled")
        return Problem(409, "CARRIER_BILLING.PAYMENT_CONFIRMED",
                       f"payment is {payment.current_status()}")

    async def validate(self, request: web.Request, call: Call) -> web.StreamResponse:
        body = await self._body(request)
        for name in ("authorizationId", "code"):
            if not isinstance(body.get(name), str):
                raise bad(f"{name} is required")
        payment = self._payment(request, call)
        if payment.validation_attempts >= MAX_VALIDATION_ATTEMPTS:
            # the attempts are used up (the payment is denied): later attempts hear the same
            raise bad("the maximum number of attempts have been consumed for this validation",
                      "CARRIER_BILLING.VALIDATION_FAILED")
        if payment.current_status() != "pending_validation":
            raise self._not_open(payment)
        if body["authorizationId"] != payment.authorization_id:
            raise bad("invalid authorizationId", "CARRIER_BILLING.INVALID_AUTHORIZATION_ID")
        if body["code"] != payment.code:
            payment.validation_attempts += 1
            if payment.validation_attempts >= MAX_VALIDATION_ATTEMPTS:
                payment.status, payment.denial_reason = "denied", "validation failed"
                self._save(payment)
                raise bad("too many wrong codes", "CARRIER_BILLING.VALIDATION_FAILED")
            self._save(payment)
            raise bad("invalid code", "CARRIER_BILLING.INVALID_CODE")
        payment.status = "reserved"
        self._save(payment)
        return web.Response(status=204)

    async def _prepared(self, request: web.Request, call: Call) -> Payment:
        """The payment a confirm or cancel names, with the phone number checks of both."""
        body = await self._body(request)
        if "phoneNumber" in body and body["phoneNumber"] is None:
            raise bad("phoneNumber does not comply with the schema")
        msisdn = self._subscriber(call, body.get("phoneNumber"))
        if msisdn is None:  # 2-legged token and no number: the spec's C02.04 (and its 422 list)
            raise Problem(422, "MISSING_IDENTIFIER", "the phone number cannot be identified: "
                          "the access token does not identify one and the body names none")
        payment = self._payment(request, call)
        if msisdn != payment.msisdn:
            raise Problem(404, "NOT_FOUND", "no such payment for this phone number")
        return payment

    async def confirm(self, request: web.Request, call: Call) -> web.StreamResponse:
        payment = await self._prepared(request, call)
        if payment.current_status() != "reserved":
            raise self._not_open(payment)
        if payment.msisdn in self.policy(call.carrier.carrier_id).denied:
            payment.status, payment.denial_reason = "denied", "payment denied by business rules"
            self._save(payment)
            raise Problem(403, "CARRIER_BILLING.PAYMENT_DENIED", "payment denied by business "
                          "rules")
        sink = {"sink": payment.transaction.pop("_sink", None),
                "sinkCredential": payment.transaction.pop("_sinkCredential", None)}
        with self.core.atomic():
            self._settle(call.carrier, payment, sink, None)
            payment.ready_at = 0.0  # the debit is done before the answer
            self._save(payment)
        return web.Response(status=202)

    async def cancel(self, request: web.Request, call: Call) -> web.StreamResponse:
        payment = await self._prepared(request, call)
        if payment.current_status() not in ("pending_validation", "reserved"):
            raise self._not_open(payment)
        sink = {"sink": payment.transaction.pop("_sink", None),
                "sinkCredential": payment.transaction.pop("_sinkCredential", None)}
        payment.status = "cancelled"
        self._save(payment)
        self._notify(call.carrier, sink, "carrier-billing.v0.payment-cancelled", {
            "paymentId": payment.payment_id, "status": "succeeded",
            "description": "payment cancelled"})
        return web.Response(status=202)

    async def get_payment(self, request: web.Request, call: Call) -> web.StreamResponse:
        return web.json_response(self._payment(request, call).view())

    @staticmethod
    def _page(request: web.Request, items: list[Any], code_prefix: str) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
            per_page = int(request.query.get("perPage", "10"))
        except ValueError:
            raise bad("page and perPage must be integers") from None
        if page < 1 or per_page < 1:
            raise bad("page and perPage must be at least 1")
        if page > 1 and (page - 1) * per_page >= len(items):
            raise bad("page out of range", f"{code_prefix}.OUT_OF_RANGE")
        if per_page > MAX_PER_PAGE:
            raise bad(f"at most {MAX_PER_PAGE} per page", f"{code_prefix}.TOO_MANY_MATCHING_RECORDS")
        window = items[(page - 1) * per_page: page * per_page]
        return web.json_response(window, headers={"X-Total-Count": str(len(items))})

    @staticmethod
    def _filters(request: web.Request, date_name: str, statuses: tuple[str, ...],
                 code_prefix: str) -> tuple[datetime | None, datetime | None, bool, set[str]]:
        query = request.query
        since = parse_when(query[f"{date_name}.gte"], f"{date_name}.gte") \
            if f"{date_name}.gte" in query else None
        until = parse_when(query[f"{date_name}.lte"], f"{date_name}.lte") \
            if f"{date_name}.lte" in query else None
        if since and until and since > until:
            raise bad("the start date is after the end date", f"{code_prefix}.INVALID_DATE_RANGE")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad("order is asc or desc")
        wanted: set[str] = set()
        for name in ("paymentStatus", "refundStatus"):
            for value in query.getall(name, []):
                wanted |= {v for v in value.split(",") if v}
        if not wanted <= set(statuses):
            raise bad(f"unknown status in {sorted(wanted - set(statuses))}")
        return since, until, order == "desc", wanted

    async def list_payments(self, request: web.Request, call: Call) -> web.StreamResponse:
        """retrievePayments: how a client finds its payment by clientCorrelator."""
        carrier = call.carrier
        if not carrier.status_lookup:
            return lookup_absent()
        fault = self.core.take_lookup_fault(carrier.carrier_id)
        if fault is not None and fault.status == 401:
            raise Problem(401, "UNAUTHENTICATED", "invalid token")
        if fault is not None:
            raise Problem(fault.status or 500, "INTERNAL", "server error")
        since, until, newest_first, wanted = self._filters(
            request, "paymentCreationDate", PAYMENT_STATUSES, "CARRIER_BILLING")
        merchant = request.query.get("merchantIdentifier")
        mine = [p for p in self.payments.values()
                if p.carrier_id == carrier.carrier_id and p.visible()
                and (call.grant.phone is None or p.msisdn == call.grant.phone)
                and (since is None or p.created_at() >= since)
                and (until is None or p.created_at() <= until)
                and (not wanted or p.current_status() in wanted)
                and (merchant is None or _dig(p.transaction, "paymentAmount", "chargingMetaData",
                                              "merchantIdentifier") == merchant)]
        mine.sort(key=lambda p: (p.created_at(), p.payment_id), reverse=newest_first)
        return self._page(request, [p.view() for p in mine], "CARRIER_BILLING")

    def _read_refund(self, call: Call, body: dict[str, Any], payment: Payment
                     ) -> tuple[dict[str, Any], Decimal, str | None]:
        kind = body.get("type")
        if kind not in ("total", "partial"):
            raise bad("type is total or partial")
        transaction = body.get("amountTransaction")
        if not isinstance(transaction, dict) or not isinstance(
                transaction.get("refundAmount"), dict):
            raise bad("amountTransaction.refundAmount is required")
        if not isinstance(transaction.get("referenceCode"), str) or not transaction[
                "referenceCode"]:
            raise bad("amountTransaction.referenceCode is required")
        key = transaction.get("clientCorrelator")
        if key is not None and not isinstance(key, str):
            raise bad("clientCorrelator must be a string")
        self._check_sink(body)
        remaining = payment.amount - payment.refunded()
        if kind == "total":
            return transaction, remaining, key
        info = transaction["refundAmount"].get("chargingInformation")
        amount = self._charging(call.carrier, info, "refundAmount")
        self._check_refund_details(call.carrier, transaction["refundAmount"], payment)
        if bool(info.get("isTaxIncluded", False)) != bool(_dig(
                payment.transaction, "paymentAmount", "chargingInformation", "isTaxIncluded")
                or False):
            raise Problem(422, "CARRIER_BILLING_REFUND.TAXES_MANAGEMENT_MISMATCH",
                          "isTaxIncluded differs from the payment's")
        policy = self.policy(call.carrier.carrier_id)
        if amount > remaining or (policy.max_refund_amount is not None
                                  and amount > policy.max_refund_amount):
            raise Problem(422, "CARRIER_BILLING_REFUND.UNAUTHORIZED_AMOUNT",
                          "the refund exceeds what is left of the payment")
        return transaction, amount, key

    def _check_refund_details(self, carrier: SimCarrier, refund_amount: dict[str, Any],
                              payment: Payment) -> None:
        """refundDetails: schema-valid items (400), each naming an item of the payment's
        paymentDetails in its currency, for no more than that item (422 otherwise)."""
        details = refund_amount.get("refundDetails")
        if details is None:
            return
        if not isinstance(details, list) or not details or not all(
                isinstance(d, dict) and isinstance(d.get("paymentItemId"), str)
                and isinstance(d.get("description"), str) for d in details):
            raise bad("refundDetails does not comply with the schema")
        items = {str(i.get("id")): i for i in _dig(
            payment.transaction, "paymentAmount", "paymentDetails") or [] if isinstance(i, dict)}
        for detail in details:
            amount = _number(detail.get("amount"), "refundDetails amount", Decimal("0.001"))
            currency = detail.get("currency")
            if not isinstance(currency, str) or not CURRENCY.fullmatch(currency):
                raise bad("refundDetails currency must be an ISO 4217 code")
            item = items.get(detail["paymentItemId"])
            if item is None or currency != item.get("currency") or amount > Decimal(
                    str(item.get("amount", 0))):
                raise Problem(422, "CARRIER_BILLING_REFUND.REFUND_DETAILS_MISMATCH",
                              "refundDetails do not match the payment's paymentDetails")

    def _refund_rules(self, carrier: SimCarrier, payment: Payment, amount: Decimal) -> None:
        """The operator's business rules and regulation for refunds (set by policy)."""
        policy = self.policy(carrier.carrier_id)
        if payment.msisdn in policy.not_refundable:
            raise Problem(403, "CARRIER_BILLING_REFUND.PAYMENT_NOT_ELIGIBLE_FOR_REFUND",
                          "the payment's conditions do not allow a refund")
        if payment.msisdn in policy.refund_denied:
            raise Problem(403, "CARRIER_BILLING_REFUND.REFUND_DENIED", "refund denied by "
                          "business rules")
        if policy.refund_threshold_amount is not None:
            refunded = sum((p.refunded() for p in self.payments.values()
                            if p.carrier_id == carrier.carrier_id and p.msisdn == payment.msisdn),
                           Decimal(0))
            if refunded + amount > policy.refund_threshold_amount:
                raise Problem(422, "CARRIER_BILLING_REFUND.USER_AMOUNT_THRESHOLD_OVERPASSED",
                              "the refunds of this phone number would overpass the accumulated "
                              "threshold")

    def _reference_in_use(self, carrier: SimCarrier, reference: str) -> bool:
        """Whether a refund (not denied) of this carrier already has this referenceCode."""
        return any(r["amountTransaction"].get("referenceCode") == reference
                   and r["refundStatus"] != "denied"
                   for p in self.payments.values() if p.carrier_id == carrier.carrier_id
                   for r in p.refunds)

    async def create_refund(self, request: web.Request, call: Call) -> web.StreamResponse:
        carrier = call.carrier
        body = await self._body(request)
        payment = self._payment(request, call)
        transaction, amount, key = self._read_refund(call, body, payment)
        if key is not None:
            duplicate = self._duplicate(carrier, key)
            if duplicate is not None:
                return duplicate
        # without a clientCorrelator, the referenceCode of a live refund is what tells a repeat
        if key is None and self._reference_in_use(carrier, transaction["referenceCode"]):
            raise Problem(409, "ALREADY_EXISTS", "a refund with this referenceCode exists")
        if payment.current_status() != "succeeded":
            raise Problem(422, "CARRIER_BILLING_REFUND.INVALID_PAYMENT_STATUS",
                          f"payment is {payment.current_status()}")
        if amount <= 0:  # the spec lists PAYMENT_NOT_ELIGIBLE_FOR_REFUND among its 403s
            raise Problem(403, "CARRIER_BILLING_REFUND.PAYMENT_NOT_ELIGIBLE_FOR_REFUND",
                          "the payment is refunded already")
        self._refund_rules(carrier, payment, amount)
        fault = self.core.take_fault(carrier.carrier_id, payment.msisdn)
        refusal = await self._refuse(fault, "{refund")
        if refusal is not None:
            return refusal
        visible_at = fault.visible_at() if fault else 0.0
        now = datetime.now(UTC).isoformat()
        refund: dict[str, Any] = {
            "refundId": f"{payment.payment_id}-r{len(payment.refunds) + 1}",
            "refundStatus": "succeeded", "type": body["type"], "refundCreationDate": now,
            "amountTransaction": transaction, "_amount": str(amount)}
        if isinstance(body.get("reason"), str):
            refund["reason"] = body["reason"]
        policy = self.policy(carrier.carrier_id)
        if payment.msisdn in policy.pending:
            # the billing back end has not answered: processing, nothing credited, no event yet
            refund["refundStatus"] = "processing"
            with self.core.atomic():
                self._use(carrier, key or str(refund["refundId"]), payment.payment_id,
                          str(refund["refundId"]), visible_at)
                payment.refunds.append(refund)
                self._save(payment)
            return web.json_response(refund_view(refund), status=201)
        with self.core.atomic():  # the key, the credit and the refund record: one commit
            try:
                if payment.book_reference is None:
                    raise RefundRefused("payment not charged")
                if payment.msisdn in policy.refund_failing:
                    raise RefundRefused("refund refused by the billing system")
                self.core.books[carrier.carrier_id].refund(
                    payment.msisdn, amount, key or refund["refundId"], "refund",
                    payment.book_reference, visible_at)
                refund["refundDate"], event, status = now, "refund-completed", "succeeded"
            except RefundRefused as exc:
                refund["refundStatus"], refund["denialReason"] = "denied", str(exc)
                event, status = "refund-denied", "failed"
            self._use(carrier, key or str(refund["refundId"]), payment.payment_id,
                      str(refund["refundId"]), visible_at)
            payment.refunds.append(refund)
            self._save(payment)
        data = {"paymentId": payment.payment_id, "refundId": refund["refundId"],
                "status": status, "description": event}
        if "refundDate" in refund:
            data["refundDate"] = refund["refundDate"]
        self._notify(carrier, body, f"carrier-billing-refund.v0.{event}", data, fault)
        await lose_answer_after_debit(request, fault)
        return web.json_response(refund_view(refund), status=201)

    async def list_refunds(self, request: web.Request, call: Call) -> web.StreamResponse:
        payment = self._payment(request, call)
        since, until, newest_first, wanted = self._filters(
            request, "refundCreationDate", REFUND_STATUSES, "CARRIER_BILLING_REFUND")
        merchant = request.query.get("merchantIdentifier")

        def created(refund: dict[str, Any]) -> datetime:
            return parse_when(str(refund["refundCreationDate"]), "refundCreationDate")

        refunds = [r for r in payment.refunds
                   if (since is None or created(r) >= since)
                   and (until is None or created(r) <= until)
                   and (not wanted or r["refundStatus"] in wanted)
                   and (merchant is None or _dig(r, "amountTransaction", "refundAmount",
                                                 "chargingMetaData", "merchantIdentifier")
                        == merchant)]
        refunds.sort(key=lambda r: (created(r), r["refundId"]), reverse=newest_first)
        return self._page(request, [refund_view(r) for r in refunds], "CARRIER_BILLING_REFUND")

    async def get_refund(self, request: web.Request, call: Call) -> web.StreamResponse:
        payment = self._payment(request, call)
        refund = next((r for r in payment.refunds
                       if r["refundId"] == request.match_info["refund_id"]), None)
        if refund is None:
            raise Problem(404, "NOT_FOUND", "no such refund")
        return web.json_response(refund_view(refund))

    async def remaining_amount(self, request: web.Request, call: Call) -> web.StreamResponse:
        payment = self._payment(request, call)
        info = _dig(payment.transaction, "paymentAmount", "chargingInformation") or {}
        remaining = payment.amount - payment.refunded() if payment.book_reference else Decimal(0)
        return web.json_response({"amount": float(remaining), "currency": self.core.carriers[
            payment.carrier_id].currency, "isTaxIncluded": bool(info.get("isTaxIncluded", False))})

    # -- control (tests and the demo) ----------------------------------------------------------

    async def otp(self, request: web.Request) -> web.Response:
        """Test hook: the code the subscriber would have received by SMS."""
        payment = self.payments.get(request.query.get("paymentId", ""))
        if payment is None:
            raise web.HTTPNotFound()
        return web.json_response({"code": payment.code})

    async def issue_token(self, request: web.Request) -> web.Response:
        """Test hook: a token as an authorisation server would issue it, with chosen scopes, a
        phone number (3-legged), or already expired."""
        body = await request.json()
        carrier = self.core.carriers[str(body["carrier"])]
        token = secrets.token_urlsafe(24)
        lifetime = -1.0 if body.get("expired") else 300.0
        self.core.tokens[token] = (carrier.carrier_id, time.time() + lifetime)
        scopes = body.get("scopes")
        self.grants[token] = Grant(frozenset(scopes) if scopes is not None else None,
                                   body.get("phoneNumber"))
        return web.json_response({"access_token": token})

    async def set_policy(self, request: web.Request) -> web.Response:
        body = await request.json()
        policy = self.policy(str(body["carrier"]))
        for name in ("number_prefixes",):
            if name in body:
                setattr(policy, name, list(body[name]))
        for name in ("denied", "not_applicable", "pending", "refund_denied", "refund_failing",
                     "not_refundable"):
            if name in body:
                setattr(policy, name, set(body[name]))
        for name in ("max_amount", "threshold_amount", "max_refund_amount",
                     "refund_threshold_amount"):
            if name in body:
                setattr(policy, name, None if body[name] is None else Decimal(str(body[name])))
        if "rate_limit" in body:
            policy.rate_limit = body["rate_limit"]
            policy.seen.clear()
        return web.json_response({"ok": True})

    async def backdate(self, request: web.Request) -> web.Response:
        """Test hook: a payment (or one of its refunds) created some days ago."""
        body = await request.json()
        payment = self.payments[str(body["paymentId"])]
        moment = (datetime.now(UTC) - timedelta(days=float(body["days"]))).isoformat()
        if body.get("refundId"):
            for refund in payment.refunds:
                if refund["refundId"] == body["refundId"]:
                    refund["refundCreationDate"] = moment
        else:
            payment.created = moment
        self._save(payment)
        return web.json_response({"ok": True})
