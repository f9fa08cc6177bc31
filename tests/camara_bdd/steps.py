"""Step definitions for CAMARA's carrier billing Gherkin files, written for our simulator."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pytest_bdd import given, parsers, then, when

from simulators.core import SimCarrier, SimulatorCore
from simulators.server import start_simulator

CARRIER = "bdd-op"
PREFIX = "+3460"
OPERATIONS = {  # operation -> (method, api, path)
    "createPayment": ("POST", "payments", "/payments"),
    "preparePayment": ("POST", "payments", "/payments/prepare"),
    "retrievePayments": ("GET", "payments", "/payments"),
    "retrievePayment": ("GET", "payments", "/payments/{paymentId}"),
    "validatePayment": ("POST", "payments", "/payments/{paymentId}/validate"),
    "confirmPayment": ("POST", "payments", "/payments/{paymentId}/confirm"),
    "cancelPayment": ("POST", "payments", "/payments/{paymentId}/cancel"),
    "createRefund": ("POST", "refunds", "/payments/{paymentId}/refunds"),
    "retrieveRefunds": ("GET", "refunds", "/payments/{paymentId}/refunds"),
    "retrieveRefund": ("GET", "refunds", "/payments/{paymentId}/refunds/{refundId}"),
    "retrievePaymentRemainingAmount": ("GET", "refunds",
                                       "/payments/{paymentId}/refunds/remaining-amount"),
}
_numbers = iter(range(10_000_000, 99_999_999))


def fresh_number() -> str:
    return f"{PREFIX}{next(_numbers)}"


@dataclass
class Operator:
    url: str
    # one connection pool for the whole run: a client per request costs ~50 ms (TLS context)
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10, trust_env=False))

    def api(self, which: str) -> str:
        name = "carrier-billing" if which == "payments" else "carrier-billing-refund"
        return f"{self.url}/{CARRIER}/camara/{name}/v0"

    def control(self, path: str, body: dict[str, Any]) -> Any:
        reply = self.http.post(f"{self.url}/_control/{path}", json=body)
        reply.raise_for_status()
        return reply.json()

    def token(self, **grant: Any) -> str:
        return str(self.control("camara/token", {"carrier": CARRIER, **grant})["access_token"])


@pytest.fixture(scope="session")
def operator() -> Iterator[Operator]:
    """The simulator in a thread of its own: steps are synchronous and call it over a socket."""
    core = SimulatorCore({CARRIER: SimCarrier(CARRIER, "camara", "EUR", "bdd", "pw", "oauth2",
                                              callback_secret="sink", deduplicates_by_key="error")},
                         Decimal("1000"))
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner, port = loop.run_until_complete(start_simulator(core))
        ready.update(runner=runner, port=port)
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    operator = Operator(f"http://127.0.0.1:{ready['port']}")
    operator.control("camara/policy", {"carrier": CARRIER, "number_prefixes": [PREFIX]})
    yield operator
    operator.http.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@dataclass
class Ctx:
    op: Operator
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    send_body: bool = True
    path: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    reply: httpx.Response | None = None
    operation: str = ""
    phone: str = field(default_factory=fresh_number)
    resource: str = ""
    sent_body: Any = None
    created: list[str] = field(default_factory=list)  # payments this scenario made
    authorization_id: str = ""
    merchant: str = ""
    asked_at: dict[str, str] = field(default_factory=dict)  # "NOW - 1 day" -> ISO moment
    refunds: list[str] = field(default_factory=list)  # refunds this scenario made
    refunded: float = 0.0
    tags: set[str] = field(default_factory=set)  # the scenario's Gherkin tags
    unknown: set[str] = field(default_factory=set)  # path parameters naming nothing on purpose

    def payment_body(self, merchant: str = "", **charging: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"amountTransaction": {
            "phoneNumber": self.phone, "referenceCode": f"REF-{uuid.uuid4().hex[:10]}",
            "clientCorrelator": uuid.uuid4().hex,
            "paymentAmount": {"chargingInformation": {
                "amount": 1.5, "currency": "EUR", "description": "Game Pass", **charging}}}}
        if merchant:
            body["amountTransaction"]["paymentAmount"]["chargingMetaData"] = {
                "merchantIdentifier": merchant}
        return body

    def call(self, operation: str, body: Any = None, path: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> httpx.Response:
        method, which, template = OPERATIONS[operation]
        url = self.op.api(which) + template.format(**(path or self.path))
        return self.op.http.request(method, url, headers=headers or self.headers,
                             content=None if body is None else json.dumps(body),
                             params=self.query or None)

    def new_payment(self, two_step: bool = False, confirm: bool = False) -> str:
        reply = self.call("preparePayment" if two_step else "createPayment", self.payment_body())
        assert reply.status_code == 201, reply.text
        payment_id = str(reply.json()["paymentId"])
        if two_step:
            self.authorization_id = reply.json()["validationInfo"]["authorizationId"]
        if confirm:
            auth = reply.json()["validationInfo"]["authorizationId"]
            code = self.op.http.get(f"{self.op.url}/_control/camara/otp",
                             params={"paymentId": payment_id}).json()["code"]
            assert self.call("validatePayment", {"authorizationId": auth, "code": code},
                             {"paymentId": payment_id}).status_code == 204
        return payment_id


@pytest.fixture
def ctx(operator: Operator, request: pytest.FixtureRequest) -> Ctx:
    return Ctx(operator, tags={m.name for m in request.node.iter_markers()})


# The "testing assets" the feature files ask the implementation for ("a phone number not-eligible
# for payment", "refund behaviour mode: async"): scenario tag -> the operator policy that makes
# the scenario's phone number that asset. Applied just before the request is sent, as the
# business context exists at that moment (a confirm is denied after its payment was prepared).
ASSETS: dict[str, str] = {
    "create_payment_403.02_payment_denied": "denied",
    "prepare_payment_403.02_payment_denied": "denied",
    "confirm_payment_403.02_payment_denied": "denied",
    "create_refund_403.02_refund_denied": "refund_denied",
    "create_refund_403.03_payment_not_eligible_for_refund": "not_refundable",
    "create_refund_12_async_behaviour": "pending",
}


def default_body(ctx: Ctx) -> Any:
    op = ctx.resource
    if op.endswith("/payments") or op.endswith("/prepare"):
        return ctx.payment_body()
    if op.endswith("/validate"):
        return {"authorizationId": "x", "code": "000000"}
    if op.endswith("/confirm") or op.endswith("/cancel"):
        return {"phoneNumber": ctx.phone}
    if op.endswith("/refunds"):
        return {"type": "total", "amountTransaction": {
            "referenceCode": f"RREF-{uuid.uuid4().hex[:10]}", "refundAmount": {}}}
    return None


def at(body: Any, path: str) -> Any:
    for part in path.removeprefix("$.").split("."):
        body = body.get(part) if isinstance(body, dict) else None
    return body


def put(body: Any, path: str, value: Any) -> None:
    parts = path.removeprefix("$.").split(".")
    for part in parts[:-1]:
        body = body.setdefault(part, {})
    body[parts[-1]] = value


def remove(body: Any, path: str) -> None:
    parts = path.removeprefix("$.").split(".")
    for part in parts[:-1]:
        body = body.get(part, {})
    body.pop(parts[-1], None)


# -- setup -------------------------------------------------------------------------------------

@given(parsers.parse('the resource "{resource}"'))
def _resource(ctx: Ctx, resource: str) -> None:
    ctx.resource = resource
    ctx.headers["Authorization"] = f"Bearer {ctx.op.token()}"
    ctx.headers["x-correlator"] = uuid.uuid4().hex


@given(parsers.parse('the header "{name}" is set to "{value}"'))
def _header(ctx: Ctx, name: str, value: str) -> None:
    ctx.headers[name] = value


@given(parsers.re(r'(the )?header "Authorization" is set to a valid access token$'))
def _valid_token(ctx: Ctx) -> None:
    ctx.headers["Authorization"] = f"Bearer {ctx.op.token()}"


@given(parsers.parse('the header "x-correlator" complies with the schema at "{ref}"'))
def _correlator(ctx: Ctx, ref: str) -> None:
    ctx.headers["x-correlator"] = uuid.uuid4().hex


@given(parsers.parse('the header "x-correlator" does not comply with the schema at "{ref}"'))
def _bad_correlator(ctx: Ctx, ref: str) -> None:
    ctx.headers["x-correlator"] = "not valid!"


@given('the header "Authorization" is removed')
def _no_token(ctx: Ctx) -> None:
    ctx.headers.pop("Authorization", None)


@given('the header "Authorization" is set to an expired access token')
def _expired(ctx: Ctx) -> None:
    ctx.headers["Authorization"] = f"Bearer {ctx.op.token(expired=True)}"


@given('the header "Authorization" is set to an invalid access token')
def _invalid(ctx: Ctx) -> None:
    ctx.headers["Authorization"] = "Bearer not-a-token"


@given(parsers.re(r'(the )?header "Authorization" is set to an access token without the '
                  r'required scope'))
def _no_scope(ctx: Ctx) -> None:
    ctx.headers["Authorization"] = f"Bearer {ctx.op.token(scopes=[])}"


@given('the header "Authorization" is set to a valid access token which does not identify a '
       'single phone number')
def _two_legged(ctx: Ctx) -> None:
    _valid_token(ctx)


@given('the header "Authorization" is set to a valid access token identifying a phone number')
def _three_legged(ctx: Ctx) -> None:
    ctx.headers["Authorization"] = f"Bearer {ctx.op.token(phoneNumber=ctx.phone)}"


@given('the request body is set by default to a request body compliant with the schema')
def _default_body(ctx: Ctx) -> None:
    ctx.body = default_body(ctx)


@given(parsers.re(r'the request body is set to a valid request body$'))
@given(parsers.parse('the request body property "{name}" is set with valid required information'))
def _valid_body(ctx: Ctx, name: str = "") -> None:
    if ctx.body is None:
        ctx.body = default_body(ctx)


@given('the request body is not included')
def _no_body(ctx: Ctx) -> None:
    ctx.body = None


@given(parsers.parse('the request body is set to "{text}"'))
def _body_text(ctx: Ctx, text: str) -> None:
    ctx.body = json.loads(text)


@given(parsers.re(r'the request body property "(?P<name>[^"]+)" is (not included|missing)'))
def _missing(ctx: Ctx, name: str) -> None:
    remove(ctx.body, phone_path(ctx, name))


@given(parsers.parse('the request body property "{name}" is set to true'))
def _true(ctx: Ctx, name: str) -> None:
    if ctx.resource.endswith("/refunds") and name.endswith(".isTaxIncluded"):
        # a gross refund is of a gross payment (a net one would be TAXES_MANAGEMENT_MISMATCH)
        ctx.path["paymentId"] = succeeded_payment(ctx, amount=10, isTaxIncluded=True)
    put(ctx.body, name, True)


@given(parsers.parse('the request body property "{name}" is set to false OR not set'))
def _false(ctx: Ctx, name: str) -> None:
    put(ctx.body, name, False)


@given(parsers.re(r'the request body property "(?P<name>[^"]+)" is set (to|with) a valid value$'))
def _valid_value(ctx: Ctx, name: str) -> None:
    if ctx.resource.endswith("/validate") and name in ("$.authorizationId", "$.code"):
        put(ctx.body, name, ctx.authorization_id if name == "$.authorizationId" else otp(
            ctx, ctx.path["paymentId"]))
        return
    values = {"taxAmount": 0.2, "merchantIdentifier": "merchant-1", "type": "total",
              "clientCorrelator": uuid.uuid4().hex, "phoneNumber": ctx.phone}
    put(ctx.body, name, values.get(name.rsplit(".", 1)[-1], "value"))


@given(parsers.parse('the request body property "{name}" is set to a valid value which is the '
                     'same as associated to access token'))
def _same_as_token(ctx: Ctx, name: str) -> None:
    ctx.headers["Authorization"] = f"Bearer {ctx.op.token(phoneNumber=ctx.phone)}"
    put(ctx.body, name, ctx.phone)


@given(parsers.parse('the request body array property "{name}" is set with valid information'))
def _details(ctx: Ctx, name: str) -> None:
    if name.endswith("refundDetails"):  # items of the refund-eligible payment's paymentDetails
        put(ctx.body, name, [{"paymentItemId": ITEM, "amount": 1, "currency": "EUR",
                              "description": "x"}])
    else:
        put(ctx.body, name, [{"id": "i1", "amount": 1.5, "currency": "EUR",
                              "description": "x"}])


@given(parsers.re(r'the request body property "\$\.sink" is set with a valid (HTTPS )?URL'))
def _sink(ctx: Ctx) -> None:
    ctx.body["sink"] = "https://sink.example.com/events"


@given(parsers.parse('the request body property "$.sinkCredential" is set to a valid credential '
                     'with property "{p}" set to "{v}"'))
def _credential(ctx: Ctx, p: str, v: str) -> None:
    ctx.body["sinkCredential"] = {"credentialType": v, "accessToken": "t",
                                  "accessTokenType": "bearer"}


@given(parsers.re(r'the request body property "(?P<name>[^"]+)" does not comply with the OAS '
                  r'schema at .*'))
def _not_compliant(ctx: Ctx, name: str) -> None:
    if name == "$.phoneNumber":
        name = "$.amountTransaction.phoneNumber" if "amountTransaction" in (
            ctx.body or {}) else name
        put(ctx.body, name, "12345")
    else:
        put(ctx.body, name, 12345)


@given(parsers.parse('the request body property includes property "{name}" which is not set to '
                     'an url'))
def _not_url(ctx: Ctx, name: str) -> None:
    ctx.body["sink"] = "not a url"


@given(parsers.parse('the request body property includes property "{name}" whose value is not '
                     '"{value}"'))
def _credential_wrong(ctx: Ctx, name: str, value: str) -> None:
    credential = {"credentialType": "ACCESSTOKEN", "accessToken": "t", "accessTokenType": "bearer"}
    put({"sinkCredential": credential}, name, "PLAIN" if value == "ACCESSTOKEN" else "mac")
    ctx.body["sink"] = "https://sink.example.com/events"
    ctx.body["sinkCredential"] = credential


@given(parsers.parse('the path parameter "{name}" is set to a valid value'))
def _path_valid(ctx: Ctx, name: str) -> None:
    if "paymentId" not in ctx.path:
        two_step = "/validate" in ctx.resource or "/confirm" in ctx.resource or \
            "/cancel" in ctx.resource
        ctx.path["paymentId"] = ctx.new_payment(two_step, confirm="/confirm" in ctx.resource)
        if "/validate" in ctx.resource:
            reply = ctx.call("retrievePayment", path=ctx.path)
            assert reply.status_code == 200


# -- sending and checking -------------------------------------------------------------------

@when(parsers.parse('the request "{operation}" is sent'))
def _send(ctx: Ctx, operation: str) -> None:
    for tag in ctx.tags & ASSETS.keys():
        policy(ctx, **{ASSETS[tag]: [ctx.phone]})
    ctx.operation = operation
    ctx.sent_body = ctx.body
    ctx.path.setdefault("paymentId", "unknown-payment")
    ctx.path.setdefault("refundId", "unknown-refund")
    ctx.reply = ctx.call(operation, ctx.body)


def reply_of(ctx: Ctx) -> httpx.Response:
    assert ctx.reply is not None
    return ctx.reply


@then(parsers.parse('the response status code is {status:d}'))
def _status(ctx: Ctx, status: int) -> None:
    assert reply_of(ctx).status_code == status, reply_of(ctx).text


@then(parsers.parse('the response header "{name}" is "{value}"'))
def _response_header(ctx: Ctx, name: str, value: str) -> None:
    assert reply_of(ctx).headers.get(name, "").split(";")[0] == value


@then(parsers.parse('the response header "{name}" has same value as the request header "{req}"'))
def _echo(ctx: Ctx, name: str, req: str) -> None:
    assert reply_of(ctx).headers.get(name) == ctx.headers.get(req)


@then(parsers.re(r'the response (body )?property "(?P<name>[^"]+)" is (?P<value>\d+|"[^"]*"|true)$'))
def _property(ctx: Ctx, name: str, value: str) -> None:
    expected: Any = json.loads(value)
    found = at(reply_of(ctx).json(), name)
    if expected == "{}":  # the features write an empty object as "{}"
        expected = {}
    if isinstance(found, (int, float)) and not isinstance(found, bool) and isinstance(
            expected, str) and re.fullmatch(r"-?\d+(\.\d+)?", expected):
        expected = float(expected)  # a number the features write quoted ("$.amount" is "0")
    assert found == expected or (expected == {} and found in ({}, None)), (found, expected)


@then(parsers.parse('the response property "{name}" contains a user friendly text'))
def _friendly(ctx: Ctx, name: str) -> None:
    text = at(reply_of(ctx).json(), name)
    assert isinstance(text, str) and re.search(r"[a-z]{3}", text)


@then(parsers.parse('the response body property "{name}" has the same value as provided in the '
                    'request body'))
@then(parsers.parse('the response body array property "{name}" has the same information as '
                    'provided in the request body'))
def _same(ctx: Ctx, name: str) -> None:
    assert at(reply_of(ctx).json(), name) == at(ctx.sent_body, name)


@then(parsers.parse('the response body property "{name}" is false OR not returned'))
def _false_or_absent(ctx: Ctx, name: str) -> None:
    assert at(reply_of(ctx).json(), name) in (False, None)


@then(parsers.parse('the response body complies with the OAS schema at "{ref}"'))
def _schema(ctx: Ctx, ref: str) -> None:
    body = reply_of(ctx).json()
    required = {"Payment": ["paymentId", "paymentStatus", "amountTransaction",
                            "paymentCreationDate"], "Refund": ["refundId", "refundStatus",
                                                               "refundCreationDate", "type"]}
    name = ref.rsplit("/", 1)[-1]
    kind = "Refund" if "Refund" in name and "Amount" not in name else "Payment"
    items = body if isinstance(body, list) else [body]
    if "RemainingAmount" in name:
        assert {"amount", "currency"} <= set(body)
        return
    for item in items:
        assert set(required[kind]) <= set(item), item


# -- isolation, existing resources and operator policies -----------------------------------------

@pytest.fixture(autouse=True)
def fresh_operator(operator: Operator) -> None:
    """Every scenario starts from an operator with no payments, default policy and no rate
    limit, as the feature files assume ("no payments have been created", "N per second")."""
    operator.http.post(f"{operator.url}/_control/reset").raise_for_status()
    operator.control("camara/policy", {"carrier": CARRIER, "number_prefixes": [PREFIX]})


def policy(ctx: Ctx, **rules: Any) -> None:
    ctx.op.control("camara/policy", {"carrier": CARRIER, **rules})


ITEM = "item-1"  # the one item of the refund-eligible payments' paymentDetails


def succeeded_payment(ctx: Ctx, amount: float = 1.5, merchant: str = "",
                      **charging: Any) -> str:
    """A payment the operator has charged: prepared, validated, confirmed (succeeded at once),
    with its amount as one item of paymentDetails (what refundDetails refer to)."""
    body = ctx.payment_body(merchant, amount=amount, **charging)
    body["amountTransaction"]["paymentAmount"]["paymentDetails"] = [
        {"id": ITEM, "amount": amount, "currency": "EUR", "description": "Game Pass",
         **charging}]
    reply = ctx.call("preparePayment", body)
    assert reply.status_code == 201, reply.text
    payment_id = str(reply.json()["paymentId"])
    validate(ctx, payment_id, reply.json()["validationInfo"]["authorizationId"])
    reply = ctx.call("confirmPayment", {"phoneNumber": ctx.phone}, {"paymentId": payment_id})
    assert reply.status_code == 202, reply.text
    ctx.created.append(payment_id)
    return payment_id


def otp(ctx: Ctx, payment_id: str) -> str:
    """The code the operator sent the subscriber by SMS (the simulator's test hook)."""
    reply = ctx.op.http.get(f"{ctx.op.url}/_control/camara/otp", params={"paymentId": payment_id})
    reply.raise_for_status()
    return str(reply.json()["code"])


def validate(ctx: Ctx, payment_id: str, authorization_id: str) -> None:
    code = otp(ctx, payment_id)
    reply = ctx.call("validatePayment", {"authorizationId": authorization_id, "code": code},
                     {"paymentId": payment_id})
    assert reply.status_code == 204, reply.text


def payment_in(ctx: Ctx, status: str, merchant: str = "") -> str:
    """A payment of ctx.phone left in the given status."""
    if status == "succeeded":
        return succeeded_payment(ctx, merchant=merchant)
    two_step = status != "processing"
    if not two_step:  # the operator's billing back end holds it: it stays processing
        policy(ctx, pending=[ctx.phone])
    reply = ctx.call("preparePayment" if two_step else "createPayment",
                     ctx.payment_body(merchant))
    assert reply.status_code == 201, reply.text
    if not two_step:
        policy(ctx, pending=[])
    payment_id = str(reply.json()["paymentId"])
    ctx.created.append(payment_id)
    if status in ("reserved", "denied"):
        if status == "denied":
            policy(ctx, denied=[ctx.phone])
        validate(ctx, payment_id, reply.json()["validationInfo"]["authorizationId"])
        if status == "denied":
            denied = ctx.call("confirmPayment", {"phoneNumber": ctx.phone},
                              {"paymentId": payment_id})
            assert denied.status_code == 403, denied.text
            policy(ctx, denied=[])
    elif status == "cancelled":
        cancelled = ctx.call("cancelPayment", {"phoneNumber": ctx.phone},
                             {"paymentId": payment_id})
        assert cancelled.status_code == 202, cancelled.text
    return payment_id


def backdate(ctx: Ctx, payment_id: str, days: float, refund_id: str = "") -> None:
    ctx.op.control("camara/backdate", {"paymentId": payment_id, "days": days,
                                       "refundId": refund_id})


RATE_LIMIT = 2  # the N of "N transactions per second"
AGES = (0, 2, 5, 10, 20, 40)  # days: on both sides of every NOW - N used by the features


@given('the path parameter "paymentId" is set to a valid refund-eligible payment value')
def _refund_eligible(ctx: Ctx) -> None:
    ctx.path["paymentId"] = succeeded_payment(ctx, amount=10)


@given(parsers.re(r'(an|at least an) existing payment created by operation createPayment OR '
                  r'preparePayment$'))
def _existing_payment(ctx: Ctx) -> None:
    ctx.path["paymentId"] = succeeded_payment(ctx, amount=10)


@given(parsers.re(r'several existing payments created by operation createPayment OR '
                  r'preparePayment(?P<variant>.*)$'))
def _several_payments(ctx: Ctx, variant: str) -> None:
    statuses = ["pending_validation", "denied", "reserved", "succeeded", "cancelled",
                "processing"] if "status" in variant else ["succeeded"] * len(AGES)
    if "merchant" in variant:
        ctx.merchant = "merchant-bdd"
    for index, status in enumerate(statuses):
        merchant = ("merchant-bdd" if index % 2 == 0 else "merchant-other") \
            if "merchant" in variant else ""
        payment_id = payment_in(ctx, status, merchant=merchant)
        backdate(ctx, payment_id, AGES[index % len(AGES)])


@given(parsers.re(r'no (payments|refunds) have been created by operation .*'))
def _none_created(ctx: Ctx) -> None:
    if "{paymentId}" in ctx.resource:
        ctx.path["paymentId"] = succeeded_payment(ctx)


@given(parsers.parse('the path parameter "paymentId" is set to the value for that payment'))
def _that_payment(ctx: Ctx) -> None:
    assert ctx.path.get("paymentId")


@given(parsers.re(r'the header "Authorization" is set to a valid access token associated for a '
                  r'phone number with (payments|refunds) requested'))
def _token_for_phone(ctx: Ctx) -> None:
    ctx.headers["Authorization"] = f"Bearer {ctx.op.token(phoneNumber=ctx.phone)}"


@given('the header "Authorization" is set to a valid access token not emitted for a specific '
       'phone number')
def _token_for_app(ctx: Ctx) -> None:
    _valid_token(ctx)


@given(parsers.parse('the path parameter "paymentId" is set to a valid value in the environment'))
def _path_in_env(ctx: Ctx) -> None:
    ctx.path["paymentId"] = succeeded_payment(ctx)


@given(parsers.parse('the path parameter "{name}" is compliant with the schema but does not '
                     'identify a valid {what} in the environment'))
def _path_unknown(ctx: Ctx, name: str, what: str) -> None:
    ctx.path[name] = f"{what}-that-does-not-exist-{uuid.uuid4().hex[:8]}"
    ctx.unknown.add(name)


@given(parsers.re(r'the path param "paymentId" is set to a valid value of an already '
                  r'(?P<status>confirmed|cancelled) payment'))
def _closed_payment(ctx: Ctx, status: str) -> None:
    ctx.path["paymentId"] = payment_in(ctx, "succeeded" if status == "confirmed" else status)


@given('that the environment is configured with a threshold policy of N transactions per second')
def _rate_policy(ctx: Ctx) -> None:
    policy(ctx, rate_limit=RATE_LIMIT)


@given('the threshold of requests has been reached')
def _rate_reached(ctx: Ctx) -> None:
    """Most scenarios have no "configured with a threshold policy" step: configure it here
    too, then send until the operator refuses (the next request falls in the same second)."""
    _rate_policy(ctx)
    for _ in range(RATE_LIMIT + 1):
        if ctx.call("retrievePayments", path={}).status_code == 429:
            return
    raise AssertionError("the operator never refused a request")


@given('that the service is not available for all phone numbers commercialized by the operator')
def _service_partial(ctx: Ctx) -> None:
    pass  # the operator's policy lists the numbers without the service


@given('a valid phone number, identified by the token or provided in the request body, for which '
       'the service is not applicable')
def _service_not_applicable(ctx: Ctx) -> None:
    policy(ctx, not_applicable=[ctx.phone])


def phone_path(ctx: Ctx, name: str) -> str:
    if name == "$.phoneNumber" and isinstance(ctx.body, dict) and "amountTransaction" in ctx.body:
        return "$.amountTransaction.phoneNumber"
    return name


@given(parsers.parse('the request body property "{name}" is set to a valid phone number'))
def _other_phone(ctx: Ctx, name: str) -> None:
    if ctx.body is None:
        ctx.body = default_body(ctx)
    put(ctx.body, phone_path(ctx, name), fresh_number())


@given(parsers.parse('the request body property "{name}" is compliant with the schema but does not '
                     'identify a valid phone number'))
def _foreign_phone(ctx: Ctx, name: str) -> None:
    if ctx.body is None:
        ctx.body = default_body(ctx)
    put(ctx.body, phone_path(ctx, name), "+4420791234567")


@given(parsers.parse('the request body property includes property "{name}" with a non-existing '
                     'value in the environment'))
def _unknown_value(ctx: Ctx, name: str) -> None:
    payment_id = ctx.path["paymentId"]
    real = ctx.op.http.get(f"{ctx.op.url}/_control/camara/otp", params={"paymentId": payment_id}
                     ).json()["code"]
    ctx.body = {"authorizationId": ctx.authorization_id, "code": real}
    put(ctx.body, name, "999999" if real != "999999" else "000000")
    if name == "$.authorizationId":
        put(ctx.body, name, "no-such-authorization")


@when(parsers.parse('the request "{operation}" is sent after "{times:d}" times'))
def _send_repeated(ctx: Ctx, operation: str, times: int) -> None:
    for _ in range(times - 1):
        _send(ctx, operation)
    _send(ctx, operation)


@given('the request body property includes property "$.clientCorrelator" with a value already use '
       'in a non-completed payment')
def _correlator_in_use(ctx: Ctx) -> None:
    earlier = ctx.payment_body()
    assert ctx.call("preparePayment", earlier).status_code == 201
    put(ctx.body, "$.amountTransaction.clientCorrelator",
        earlier["amountTransaction"]["clientCorrelator"])


@given('the request body property "$.amountTransaction.referenceCode" is set to a value already '
       'use in another payment request')
def _reference_in_use(ctx: Ctx) -> None:
    earlier = ctx.payment_body()
    del earlier["amountTransaction"]["clientCorrelator"]
    assert ctx.call("preparePayment", earlier).status_code == 201
    put(ctx.body, "$.amountTransaction.referenceCode",
        earlier["amountTransaction"]["referenceCode"])
    remove(ctx.body, "$.amountTransaction.clientCorrelator")


@given('the request body property "$.amountTransaction.paymentAmount.chargingInformationAmount" '
       'exceeds the value allowed by the regulation')
def _over_regulation(ctx: Ctx) -> None:
    policy(ctx, max_amount=50)
    put(ctx.body, "$.amountTransaction.paymentAmount.chargingInformation.amount", 60)


@given('the request body property "$.amountTransaction.paymentAmount.chargingInformationAmount" '
       'exceeds the accumulated threshold amount value allowed by the regulation')
def _over_threshold(ctx: Ctx) -> None:
    policy(ctx, threshold_amount=20)
    succeeded_payment(ctx, amount=15)
    put(ctx.body, "$.amountTransaction.paymentAmount.chargingInformation.amount", 10)


# -- query parameters and list checks ------------------------------------------------------------

def moment(text: str) -> datetime:
    """"NOW", "NOW - 7 days" as the features write them."""
    found = re.fullmatch(r"NOW(?:\s*-\s*(\d+)\s*days?)?", text.strip())
    assert found, text
    return datetime.now(UTC) - timedelta(days=int(found.group(1) or 0))


@given(parsers.parse('the query parameter "{name}" is set to "{value}"'))
def _query(ctx: Ctx, name: str, value: str) -> None:
    if value.startswith("NOW"):
        ctx.asked_at[value] = moment(value).isoformat()
        value = ctx.asked_at[value]
    ctx.query[name] = value


@given('the query parameter "merchantIdentifier" is set to the value representing such a merchant')
def _query_merchant(ctx: Ctx) -> None:
    ctx.query["merchantIdentifier"] = ctx.merchant


def when_of(ctx: Ctx, text: str) -> datetime:
    return datetime.fromisoformat(ctx.asked_at[text]) if text in ctx.asked_at else moment(text)


def items(ctx: Ctx) -> list[dict[str, Any]]:
    body = reply_of(ctx).json()
    assert isinstance(body, list), body
    return body


def listed(kind: str) -> tuple[str, str]:
    return ("paymentCreationDate", "paymentId") if kind == "payments" else (
        "refundCreationDate", "refundId")


def everything(ctx: Ctx, kind: str) -> list[dict[str, Any]]:
    """All the resources of this scenario, unfiltered, as the operator lists them."""
    path = {"paymentId": ctx.path.get("paymentId", "")}
    reply = ctx.op.http.get(ctx.op.api("payments" if kind == "payments" else "refunds") + (
        "/payments" if kind == "payments" else "/payments/{paymentId}/refunds".format(**path)),
        headers=ctx.headers, params={"perPage": "100"})
    assert reply.status_code == 200, reply.text
    return list(reply.json())


def created_date(item: dict[str, Any], name: str) -> datetime:
    return datetime.fromisoformat(str(item[name]).replace("Z", "+00:00"))


def date_rule(ctx: Ctx, rule: str, first: str, second: str) -> Any:
    low = when_of(ctx, first)
    if rule == "greater or equal than":
        return lambda d: d >= low
    if rule == "lower or equal than":
        return lambda d: d <= low
    high = when_of(ctx, second)
    return lambda d: low <= d <= high


DATES = (r'(?:all|only) the (?P<kind>payments|refunds) (?:returned )?(?:have|with) their property '
         r'"\$(?:\[\*\])?\.(?:paymentCreationDate|refundCreationDate)" (?P<rule>greater or equal '
         r'than|lower or equal than|between) "(?P<first>[^"]+)"(?: and "(?P<second>[^"]+)")?.*')


@then(parsers.re(DATES))
def _dates(ctx: Ctx, kind: str, rule: str, first: str, second: str | None) -> None:
    name, key = listed(kind)
    holds = date_rule(ctx, rule, first, second or first)
    returned = items(ctx)
    assert all(holds(created_date(i, name)) for i in returned), returned
    expected = {i[key] for i in everything(ctx, kind) if holds(created_date(i, name))}
    assert {i[key] for i in returned} == expected


@then(parsers.re(r'all the (?P<kind>payments|refunds) returned are ordered by "(?P<order>asc|desc)" '
                 r'property .*'))
def _ordered(ctx: Ctx, kind: str, order: str) -> None:
    name, _ = listed(kind)
    dates = [created_date(i, name) for i in items(ctx)]
    assert len(dates) > 1 and dates == sorted(dates, reverse=order == "desc"), dates


@then(parsers.re(r'(?:all|only) the (?P<kind>payments|refunds) (?:returned )?(?:have|with) their '
                 r'property "\$(?:\[\*\])?\.(?P<name>paymentStatus|refundStatus)" == '
                 r'"(?P<status>[^"]+)".*'))
def _statuses(ctx: Ctx, kind: str, name: str, status: str) -> None:
    _, key = listed(kind)
    returned = items(ctx)
    assert returned and all(i[name] == status for i in returned), returned
    expected = {i[key] for i in everything(ctx, kind) if i[name] == status}
    assert {i[key] for i in returned} == expected


@then(parsers.re(r'(?:all|only) the (?P<kind>payments|refunds) (?:returned )?(?:have|with) their '
                 r'property "\$(?:\[\*\])?\.(?P<path>[^"]+merchantIdentifier)" set to the same '
                 r'value as the query parameter "merchantIdentifier".*'))
def _merchants(ctx: Ctx, kind: str, path: str) -> None:
    # the features write chargingMetadata; the schema's property is chargingMetaData
    path = path.replace("chargingMetadata", "chargingMetaData")
    _, key = listed(kind)
    returned = items(ctx)
    wanted = ctx.query["merchantIdentifier"]
    assert returned and all(at(i, path) == wanted for i in returned), returned
    expected = {i[key] for i in everything(ctx, kind) if at(i, path) == wanted}
    assert {i[key] for i in returned} == expected


@then(parsers.parse('the response body is an empty array "[]"'))
def _empty(ctx: Ctx) -> None:
    assert items(ctx) == []


@then(parsers.re(r'only the (?P<kind>payments|refunds) associated to that phone number are '
                 r'returned'))
def _only_phone(ctx: Ctx, kind: str) -> None:
    returned = items(ctx)
    assert returned
    if kind == "payments":
        assert all(at(i, "$.amountTransaction.phoneNumber") == ctx.phone for i in returned)
    else:  # refunds of the payment of that number
        assert all(i["refundId"].startswith(ctx.path["paymentId"]) for i in returned)


@then(parsers.re(r'only the (?P<kind>payments|refunds) associated to that application are '
                 r'returned'))
def _only_application(ctx: Ctx, kind: str) -> None:
    returned = items(ctx)
    assert returned
    if kind == "payments":
        assert {i["paymentId"] for i in returned} == set(ctx.created)
    else:
        assert {i["refundId"] for i in returned} == set(ctx.refunds)


@then(parsers.re(r'only five (payments|refunds) (are )?returned'))
def _five(ctx: Ctx) -> None:
    assert len(items(ctx)) == 5


# -- refunds ------------------------------------------------------------------------------------

def refund_body(kind: str = "total", amount: float = 1, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": kind, "amountTransaction": {
        "referenceCode": f"RREF-{uuid.uuid4().hex[:10]}", "refundAmount": {}}}
    if kind == "partial":
        body["amountTransaction"]["refundAmount"] = {"chargingInformation": {
            "amount": amount, "currency": "EUR", "description": "refund", **extra}}
    return body


def make_refund(ctx: Ctx, kind: str = "partial", amount: float = 1,
                merchant: str = "", status: str = "succeeded", payment_id: str = "") -> str:
    """A refund of the scenario's payment (or payment_id) that ends in the given status: the
    operator's policy holds it (processing) or its billing system refuses it (denied)."""
    body = refund_body(kind, amount)
    if merchant:
        body["amountTransaction"]["refundAmount"]["chargingMetaData"] = {
            "merchantIdentifier": merchant}
    rule = {"processing": "pending", "denied": "refund_failing"}.get(status)
    if rule:
        policy(ctx, **{rule: [ctx.phone]})
    reply = ctx.call("createRefund", body, {"paymentId": payment_id or ctx.path["paymentId"]})
    if rule:
        policy(ctx, **{rule: []})
    assert reply.status_code == 201, reply.text
    assert reply.json()["refundStatus"] == status, reply.text
    refund_id = str(reply.json()["refundId"])
    ctx.refunds.append(refund_id)
    ctx.path["refundId"] = refund_id
    return refund_id


@given(parsers.re(r'(an|at least an) existing refund created by operation createRefund$'))
def _existing_refund(ctx: Ctx) -> None:
    ctx.path["paymentId"] = succeeded_payment(ctx, amount=10)
    make_refund(ctx)


@given(parsers.parse('the path parameter "refundId" is set to a valid value in the environment'))
def _refund_in_env(ctx: Ctx) -> None:
    if "paymentId" in ctx.unknown:  # a real refund, of another payment than the one named
        make_refund(ctx, payment_id=succeeded_payment(ctx, amount=10))
        return
    if ctx.path.get("paymentId", "unknown-payment") == "unknown-payment":
        ctx.path["paymentId"] = succeeded_payment(ctx, amount=10)
    make_refund(ctx)


@given(parsers.re(r'several existing refunds created by operation createRefund(?P<variant>.*)$'))
def _several_refunds(ctx: Ctx, variant: str) -> None:
    ctx.path["paymentId"] = succeeded_payment(ctx, amount=50)
    if "merchant" in variant:
        ctx.merchant = "merchant-bdd"
    statuses = ("processing", "denied", "succeeded") if "status" in variant else ("succeeded",)
    for index, age in enumerate(AGES):
        merchant = ("merchant-bdd" if index % 2 == 0 else "merchant-other") \
            if "merchant" in variant else ""
        refund_id = make_refund(ctx, merchant=merchant, status=statuses[index % len(statuses)])
        backdate(ctx, ctx.path["paymentId"], age, refund_id)


@given(parsers.re(r'an existing (?P<kind>total|partial) refund completed successfully for that '
                  r'"paymentId"'))
def _refund_done(ctx: Ctx, kind: str) -> None:
    make_refund(ctx, kind, 4)
    ctx.refunded = 10.0 if kind == "total" else 4.0


@given(parsers.re(r'an existing (?P<kind>total|partial) refund being perfomed for that '
                  r'"paymentId"'))
def _refund_in_progress(ctx: Ctx, kind: str) -> None:
    make_refund(ctx, kind, 4, status="processing")
    ctx.refunded = 10.0 if kind == "total" else 4.0  # what is being refunded is not left


@given(parsers.re(r'an existing (?P<kind>total|partial) refund finally denied for that '
                  r'"paymentId"'))
def _refund_denied(ctx: Ctx, kind: str) -> None:
    make_refund(ctx, kind, 4, status="denied")
    ctx.refunded = 0.0


@then('the response property "$.amount" is the value of the amount of the related payment')
def _whole_amount(ctx: Ctx) -> None:
    assert reply_of(ctx).json()["amount"] == 10


@then('the response property "$.amount" is the value of "payment amount" - "refund amount"')
def _remaining(ctx: Ctx) -> None:
    assert reply_of(ctx).json()["amount"] == 10 - ctx.refunded


@given(parsers.re(r'the request body property ?"\$\.type" is set to "(?P<kind>total|partial)"'))
def _refund_type(ctx: Ctx, kind: str) -> None:
    if ctx.body is None:
        ctx.body = default_body(ctx)
    fresh = refund_body(kind, 2)
    ctx.body["type"] = kind
    ctx.body["amountTransaction"]["refundAmount"] = fresh["amountTransaction"]["refundAmount"]


@given(parsers.re(r'the request body property ?"\$\.amountTransaction" is set with valid '
                  r'required information for this refund type'))
def _refund_amount(ctx: Ctx) -> None:
    _refund_type(ctx, ctx.body.get("type", "total"))


@then(parsers.parse('the response body property "{name}" is set "{value}"'))
def _is_set(ctx: Ctx, name: str, value: str) -> None:
    assert at(reply_of(ctx).json(), name) == value


@given('the request body property "$.amountTransaction.referenceCode" is set to a value already '
       'use in another refund request')
def _refund_reference_in_use(ctx: Ctx) -> None:
    earlier = refund_body("partial", 1)
    reply = ctx.call("createRefund", earlier, {"paymentId": ctx.path["paymentId"]})
    assert reply.status_code == 201, reply.text
    put(ctx.body, "$.amountTransaction.referenceCode",
        earlier["amountTransaction"]["referenceCode"])


@given('the path parameter "paymentId" is set to a valid value of a payment whose "paymentStatus" '
       '!= "succeeded"')
def _unpaid(ctx: Ctx) -> None:
    ctx.path["paymentId"] = payment_in(ctx, "pending_validation")


@given('the request body property "$.amountTransaction.refundAmount.chargingInformation.amount" '
       'exceeds the value of the related payment OR exceeds the value allowed by the regulation')
def _refund_too_much(ctx: Ctx) -> None:
    put(ctx.body, "$.amountTransaction.refundAmount.chargingInformation.amount", 1000)


@given('the request body property "$.amountTransaction.refundAmount.chargingInformation.'
       'isTaxIncluded" is different than the value used for related payment')
def _tax_mismatch(ctx: Ctx) -> None:  # the refund-eligible payment is net (no isTaxIncluded)
    put(ctx.body, "$.amountTransaction.refundAmount.chargingInformation.isTaxIncluded", True)


@given('the request body property "$.amountTransaction.refundAmount.refundDetails" is not '
       'consistent with the value of "paymentDetails" used for related payment')
def _details_mismatch(ctx: Ctx) -> None:
    put(ctx.body, "$.amountTransaction.refundAmount.refundDetails", [
        {"paymentItemId": "no-such-item", "amount": 1, "currency": "EUR", "description": "x"}])


@given('the request body property "$.amountTransaction.refundAmount.chargingInformation.amount" '
       'exceeds the accumulated threshold amount value allowed by the regulation for refunds')
def _over_refund_threshold(ctx: Ctx) -> None:
    policy(ctx, refund_threshold_amount=5)
    make_refund(ctx, "partial", 4)
    put(ctx.body, "$.amountTransaction.refundAmount.chargingInformation.amount", 2)


@given('the request body property includes property "$.amountTransaction.clientCorrelator" with '
       'a value already use in a non-completed refund')
def _refund_correlator_in_use(ctx: Ctx) -> None:
    earlier = refund_body("partial", 1)
    earlier["amountTransaction"]["clientCorrelator"] = uuid.uuid4().hex
    policy(ctx, pending=[ctx.phone])  # the operator has not finished that refund
    reply = ctx.call("createRefund", earlier, {"paymentId": ctx.path["paymentId"]})
    policy(ctx, pending=[])
    assert reply.status_code == 201 and reply.json()["refundStatus"] == "processing", reply.text
    ctx.body["amountTransaction"]["clientCorrelator"] = earlier["amountTransaction"][
        "clientCorrelator"]


@given(parsers.parse('the request body property includes property "$.sink" with an HTTP endpoint'))
def _http_sink(ctx: Ctx) -> None:
    ctx.body["sink"] = "http://sink.example.com/events"


@given('the path parameter "refundId" is set to the value for this refund')
@given('the path parameter "paymentId" is set to the value of the payment related to this refund')
def _this_refund(ctx: Ctx) -> None:
    assert ctx.path.get("refundId") and ctx.path.get("paymentId")
