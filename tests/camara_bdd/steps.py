"""Step definitions for CAMARA's carrier billing Gherkin files, written for our simulator."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
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

    def api(self, which: str) -> str:
        name = "carrier-billing" if which == "payments" else "carrier-billing-refund"
        return f"{self.url}/{CARRIER}/camara/{name}/v0"

    def control(self, path: str, body: dict[str, Any]) -> Any:
        reply = httpx.post(f"{self.url}/_control/{path}", json=body)
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

    def payment_body(self, **charging: Any) -> dict[str, Any]:
        return {"amountTransaction": {
            "phoneNumber": self.phone, "referenceCode": f"REF-{uuid.uuid4().hex[:10]}",
            "clientCorrelator": uuid.uuid4().hex,
            "paymentAmount": {"chargingInformation": {
                "amount": 1.5, "currency": "EUR", "description": "Game Pass", **charging}}}}

    def call(self, operation: str, body: Any = None, path: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> httpx.Response:
        method, which, template = OPERATIONS[operation]
        url = self.op.api(which) + template.format(**(path or self.path))
        return httpx.request(method, url, headers=headers or self.headers,
                             content=None if body is None else json.dumps(body),
                             params=self.query or None)

    def new_payment(self, two_step: bool = False, confirm: bool = False) -> str:
        reply = self.call("preparePayment" if two_step else "createPayment", self.payment_body())
        assert reply.status_code == 201, reply.text
        payment_id = str(reply.json()["paymentId"])
        if confirm:
            auth = reply.json()["validationInfo"]["authorizationId"]
            code = httpx.get(f"{self.op.url}/_control/camara/otp",
                             params={"paymentId": payment_id}).json()["code"]
            assert self.call("validatePayment", {"authorizationId": auth, "code": code},
                             {"paymentId": payment_id}).status_code == 204
        return payment_id


@pytest.fixture
def ctx(operator: Operator) -> Ctx:
    return Ctx(operator)


def default_body(ctx: Ctx) -> Any:
    op = ctx.resource
    if op.endswith("/payments") or op.endswith("/prepare"):
        return ctx.payment_body()
    if op.endswith("/validate"):
        return {"authorizationId": "x", "code": "000000"}
    if op.endswith("/confirm") or op.endswith("/cancel"):
        return {"phoneNumber": ctx.phone}
    if op.endswith("/refunds"):
        return {"type": "total", "amountTransaction": {"referenceCode": "R1",
                                                        "refundAmount": {}}}
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
    remove(ctx.body, name)


@given(parsers.parse('the request body property "{name}" is set to true'))
def _true(ctx: Ctx, name: str) -> None:
    put(ctx.body, name, True)


@given(parsers.parse('the request body property "{name}" is set to false OR not set'))
def _false(ctx: Ctx, name: str) -> None:
    put(ctx.body, name, False)


@given(parsers.re(r'the request body property "(?P<name>[^"]+)" is set (to|with) a valid value$'))
def _valid_value(ctx: Ctx, name: str) -> None:
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
    put(ctx.body, name, [{"id": "i1", "amount": 1.5, "currency": "EUR", "description": "x"}])


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
