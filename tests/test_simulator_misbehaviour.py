"""The carrier simulators keep their books across restarts, do only what each carrier promises,
and misbehave on request the way real carriers do; all over real sockets.

Each test starts its own simulator (so faults and rotated credentials stay local to it) and talks
raw HTTP/SOAP to it, without the adapters.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from carriers.auth import HmacRequestSigner, JwtBodySigner, callback_signature
from carriers.camara import sink_token
from carriers.dev_secrets import generate_dev_secrets
from carriers.loader import default_registry
from carriers.parlayx import sp_password
from simulators.core import SimCarrier, SimulatorCore
from simulators.server import sim_carriers, start_simulator

REGISTRY = default_registry()
SECRETS = generate_dev_secrets(REGISTRY)
ONEAPI = "fr-azur"  # OneAPI, basic auth, replays a repeated key, has a look-up
OAUTH_ONEAPI = "de-rheinfunk"  # OneAPI with OAuth2 client credentials
PARLAYX_NO_PROMISES = "mx-maya"  # Parlay X, promises nothing: no dedup, no look-up
POLLING = "ke-kilima"
CALLBACKS = "es-cobromovil"
CAMARA = "br-ipe"  # CAMARA: refuses a repeated key, has a look-up

_numbers = iter(range(1_000_000, 9_999_999))


def fresh_msisdn() -> str:
    return f"+3361{next(_numbers):07d}"


def base_carriers(**overrides: dict[str, Any]) -> dict[str, SimCarrier]:
    carriers = sim_carriers(REGISTRY, SECRETS)
    for carrier_id, changes in overrides.items():
        carriers[carrier_id.replace("_", "-")] = replace(carriers[carrier_id.replace("_", "-")],
                                                         **changes)
    return carriers


@dataclass
class Sim:
    core: SimulatorCore
    url: str

    def carrier(self, carrier_id: str) -> SimCarrier:
        return self.core.carriers[carrier_id]

    async def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        async with httpx.AsyncClient(base_url=self.url) as client:
            reply = (await client.get(f"/_control/{path}") if body is None
                     else await client.post(f"/_control/{path}", json=body))
            reply.raise_for_status()
            return reply.json()

    async def fault(self, carrier: str, kind: str, **extra: Any) -> None:
        await self.control("faults", {"carrier": carrier, "kind": kind, **extra})

    async def transactions(self, carrier: str, key: str | None = None) -> list[dict[str, Any]]:
        books = await self.control(f"books?carrier={carrier}")
        return [t for t in books[carrier]["transactions"]
                if key is None or t["clientCorrelator"] == key]

    async def balance(self, carrier: str, msisdn: str) -> Decimal:
        books = await self.control(f"books?carrier={carrier}")
        return Decimal(books[carrier]["accounts"][msisdn])

    # -- OneAPI --------------------------------------------------------------------------------

    def _oneapi_path(self, carrier: str, msisdn: str) -> str:
        return f"{self.url}/{carrier}/payment/v1/tel%3A{msisdn.replace('+', '%2B')}" \
               "/transactions/amount"

    async def _oneapi_auth(self, carrier: SimCarrier, password: str | None) -> dict[str, str]:
        secret = carrier.password if password is None else password
        basic = base64.b64encode(f"{carrier.username}:{secret}".encode()).decode()
        if carrier.auth_kind != "oauth2":
            return {"Authorization": f"Basic {basic}"}
        async with httpx.AsyncClient() as client:
            reply = await client.post(f"{self.url}/{carrier.carrier_id}/oauth/token",
                                      data={"grant_type": "client_credentials"},
                                      headers={"Authorization": f"Basic {basic}"})
        token = reply.json().get("access_token", "none")
        return {"Authorization": f"Bearer {token}"}

    async def oneapi_charge(self, carrier_id: str, msisdn: str, key: str, amount: str = "1.50",
                            password: str | None = None,
                            headers: dict[str, str] | None = None) -> httpx.Response:
        carrier = self.carrier(carrier_id)
        body = {"amountTransaction": {
            "clientCorrelator": key, "endUserId": f"tel:{msisdn}", "referenceCode": "REF",
            "transactionOperationStatus": "Charged",
            "paymentAmount": {"chargingInformation": {
                "amount": amount, "currency": carrier.currency, "description": "test"}}}}
        async with httpx.AsyncClient() as client:
            return await client.post(
                self._oneapi_path(carrier_id, msisdn), json=body,
                headers=headers or await self._oneapi_auth(carrier, password))

    async def oneapi_lookup(self, carrier_id: str, msisdn: str, key: str) -> httpx.Response:
        carrier = self.carrier(carrier_id)
        async with httpx.AsyncClient() as client:
            return await client.get(self._oneapi_path(carrier_id, msisdn),
                                    params={"clientCorrelator": key},
                                    headers=await self._oneapi_auth(carrier, None))

    # -- Parlay X (vendor RequestSOAPHeader auth) ----------------------------------------------

    async def parlayx(self, carrier_id: str, operation: str, msisdn: str, key: str,
                      amount: str = "1.50", password: str | None = None) -> httpx.Response:
        carrier = self.carrier(carrier_id)
        secret = carrier.password if password is None else password
        assert carrier.auth_kind == "parlayx-header"
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        header = ('<v2:RequestSOAPHeader xmlns:v2="http://www.huawei.com.cn/schema/common/v2_1">'
                  f"<v2:spId>{carrier.username}</v2:spId>"
                  f"<v2:spPassword>{sp_password(carrier.username, secret, stamp)}"
                  f"</v2:spPassword><v2:timeStamp>{stamp}</v2:timeStamp></v2:RequestSOAPHeader>")
        ns = "http://www.csapi.org/schema/parlayx/payment/amount_charging/v2_1/local"
        body = (f'<loc:{operation} xmlns:loc="{ns}"><loc:endUserIdentifier>tel:{msisdn}'
                f"</loc:endUserIdentifier><loc:charge><description>t</description>"
                f"<currency>{carrier.currency}</currency><amount>{amount}</amount></loc:charge>"
                f"<loc:referenceCode>{key}</loc:referenceCode></loc:{operation}>")
        envelope = ('<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
                    f"<soapenv:Header>{header}</soapenv:Header><soapenv:Body>{body}"
                    "</soapenv:Body></soapenv:Envelope>")
        async with httpx.AsyncClient() as client:
            return await client.post(f"{self.url}/{carrier_id}/parlayx/AmountChargingService",
                                     content=envelope, headers={"Content-Type": "text/xml"})

    # -- the aggregators -----------------------------------------------------------------------

    async def polling(self, carrier_id: str, method: str, path: str,
                      body: dict[str, Any] | None = None,
                      params: dict[str, str] | None = None) -> httpx.Response:
        carrier = self.carrier(carrier_id)
        async with httpx.AsyncClient(
                auth=HmacRequestSigner(carrier.username, carrier.password)) as client:
            return await client.request(method, f"{self.url}/{carrier_id}/v2/{path}",
                                        json=body, params=params)

    async def callbacks(self, carrier_id: str, method: str, path: str,
                        body: dict[str, Any] | None = None,
                        params: dict[str, str] | None = None) -> httpx.Response:
        carrier = self.carrier(carrier_id)
        async with httpx.AsyncClient(
                auth=JwtBodySigner(carrier.username, carrier.password)) as client:
            return await client.request(method, f"{self.url}/{carrier_id}/api/{path}",
                                        json=body, params=params)

    # -- CAMARA --------------------------------------------------------------------------------

    async def camara(self, carrier_id: str, method: str, path: str,
                     body: dict[str, Any] | None = None,
                     params: dict[str, str] | None = None) -> httpx.Response:
        carrier = self.carrier(carrier_id)
        headers = await self._oneapi_auth(carrier, None)
        async with httpx.AsyncClient() as client:
            return await client.request(
                method, f"{self.url}/{carrier_id}/camara/carrier-billing/v0/{path}", json=body,
                params=params, headers=headers)

    def camara_payment(self, carrier_id: str, msisdn: str, key: str,
                       sink: str | None = None) -> dict[str, Any]:
        carrier = self.carrier(carrier_id)
        body: dict[str, Any] = {"amountTransaction": {
            "clientCorrelator": key, "phoneNumber": msisdn, "referenceCode": "REF",
            "paymentAmount": {"chargingInformation": {
                "amount": 1.5, "currency": carrier.currency, "description": "t"}}}}
        if sink:
            body["sink"] = sink
            body["sinkCredential"] = {"credentialType": "ACCESSTOKEN",
                                      "accessToken": sink_token(carrier.callback_secret, key),
                                      "accessTokenType": "bearer"}
        return body


@asynccontextmanager
async def running(carriers: dict[str, SimCarrier] | None = None,
                  state_path: Path | None = None) -> AsyncIterator[Sim]:
    core = SimulatorCore(carriers or base_carriers(), Decimal("100"), state_path=state_path)
    runner, port = await start_simulator(core)
    try:
        yield Sim(core, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
        core.close()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Stands in for our callback receiver: records what arrives, verifies nothing."""

    url: str = ""
    received: list[Received] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), await request.read(),
                                      time.monotonic()))
        return web.json_response({"ok": True})

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.received


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/callbacks/{carrier}", rec.handle)
    app.router.add_post("/callbacks/{carrier}/{key}", rec.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield rec
    finally:
        await runner.cleanup()


def signed_by(secret: str, received: Received) -> bool:
    return received.headers.get("X-Callback-Signature") == callback_signature(secret,
                                                                              received.body)


def key() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


# -- durable books -------------------------------------------------------------------------------


async def test_durable_books_survive_a_restart(tmp_path: Path) -> None:
    msisdn, charged = fresh_msisdn(), key()
    async with running(state_path=tmp_path) as sim:
        assert (await sim.oneapi_charge(ONEAPI, msisdn, charged)).status_code == 201
        assert await sim.balance(ONEAPI, msisdn) == Decimal("98.50")
        health = await sim.control("health")
        assert health["durable"] is True
    assert (tmp_path / "simulator.sqlite3").exists()

    async with running(state_path=tmp_path) as sim:  # a new process, the same state dir
        looked_up = await sim.oneapi_lookup(ONEAPI, msisdn, charged)
        assert looked_up.status_code == 200
        assert looked_up.json()["amountTransaction"]["transactionOperationStatus"] == "Charged"
        assert await sim.balance(ONEAPI, msisdn) == Decimal("98.50")
        repeat = await sim.oneapi_charge(ONEAPI, msisdn, charged)  # a "replay" carrier
        assert repeat.status_code == 201
        assert len(await sim.transactions(ONEAPI, charged)) == 1
        assert await sim.balance(ONEAPI, msisdn) == Decimal("98.50")
        # new references do not collide with the old ones
        assert (await sim.oneapi_charge(ONEAPI, msisdn, key())).status_code == 201
        references = [t["serverReferenceCode"] for t in await sim.transactions(ONEAPI)]
        assert len(set(references)) == 2


async def test_family_records_survive_a_restart(tmp_path: Path) -> None:
    msisdn, poll_key, cb_key, camara_key = fresh_msisdn(), key(), key(), key()
    async with running(state_path=tmp_path) as sim:
        submitted = await sim.polling(POLLING, "POST", "charges", {
            "merchant_tx_id": poll_key, "msisdn": msisdn, "amount": "2.00",
            "currency": sim.carrier(POLLING).currency})
        assert submitted.status_code == 202
        accepted = await sim.callbacks(CALLBACKS, "POST", "payments", {
            "order_id": cb_key, "msisdn": msisdn, "amount": "2.00",
            "currency": sim.carrier(CALLBACKS).currency, "callback_url": "http://127.0.0.1:9/x"})
        assert accepted.status_code == 202
        created = await sim.camara(CAMARA, "POST", "payments",
                                   sim.camara_payment(CAMARA, msisdn, camara_key))
        assert created.status_code == 201

    await asyncio.sleep(0.4)  # past the processing delays
    async with running(state_path=tmp_path) as sim:
        found = await sim.polling(POLLING, "GET", "charges", params={"merchant_tx_id": poll_key})
        assert found.status_code == 200 and found.json()["status"] == "success"
        again = await sim.polling(POLLING, "POST", "charges", {
            "merchant_tx_id": poll_key, "msisdn": msisdn, "amount": "2.00",
            "currency": sim.carrier(POLLING).currency})
        assert again.status_code == 200  # replayed, not a second debit
        assert len(await sim.transactions(POLLING, poll_key)) == 1

        found = await sim.callbacks(CALLBACKS, "GET", "payments", params={"order_id": cb_key})
        assert found.status_code == 200 and found.json()["status"] == "completed"

        listed = await sim.camara(CAMARA, "GET", "payments")
        mine = [p for p in listed.json()
                if p["amountTransaction"]["clientCorrelator"] == camara_key]
        assert [p["paymentStatus"] for p in mine] == ["succeeded"]
        repeat = await sim.camara(CAMARA, "POST", "payments",
                                  sim.camara_payment(CAMARA, msisdn, camara_key))
        assert repeat.status_code == 409  # still known as used
        assert len(await sim.transactions(CAMARA, camara_key)) == 1


async def test_book_api_used_by_the_smsc_is_durable(tmp_path: Path) -> None:
    carrier_id, msisdn = "gb-mersey", fresh_msisdn()
    async with running(state_path=tmp_path) as sim:
        book = sim.core.books[carrier_id]
        charge = book.charge(msisdn, Decimal("1.50"), "smpp-abc", "80010")
        book.refund(msisdn, Decimal("0.50"), "smpp-abc-r", "refund", charge.server_reference)
        book.account(fresh_msisdn()).balance = Decimal("3")
    async with running(state_path=tmp_path) as sim:
        snapshot = sim.core.books[carrier_id].snapshot()
        assert snapshot["accounts"][msisdn] == "99.00"
        assert len(snapshot["transactions"]) == 2


async def test_reset_clears_durable_state(tmp_path: Path) -> None:
    msisdn, charged = fresh_msisdn(), key()
    async with running(state_path=tmp_path) as sim:
        await sim.oneapi_charge(ONEAPI, msisdn, charged)
        await sim.control("reset", {})
        assert await sim.transactions(ONEAPI) == []
    async with running(state_path=tmp_path) as sim:
        assert await sim.transactions(ONEAPI) == []
        assert (await sim.oneapi_lookup(ONEAPI, msisdn, charged)).status_code == 404


# -- promises ------------------------------------------------------------------------------------


async def test_a_carrier_without_dedup_debits_twice_for_a_repeated_key() -> None:
    msisdn, repeated = fresh_msisdn(), key()
    async with running() as sim:
        for _ in range(2):
            reply = await sim.parlayx(PARLAYX_NO_PROMISES, "chargeAmount", msisdn, repeated)
            assert reply.status_code == 200, reply.text
        booked = await sim.transactions(PARLAYX_NO_PROMISES, repeated)
        assert [(t["kind"], t["amount"]) for t in booked] == [("charge", "1.50")] * 2
        assert await sim.balance(PARLAYX_NO_PROMISES, msisdn) == Decimal("97.00")


async def test_oneapi_without_dedup_debits_twice_and_with_error_refuses() -> None:
    msisdn = fresh_msisdn()
    carriers = base_carriers(fr_azur={"deduplicates_by_key": "no"},
                             fr_lumiere={"deduplicates_by_key": "error"})
    async with running(carriers) as sim:
        repeated = key()
        for _ in range(2):
            assert (await sim.oneapi_charge(ONEAPI, msisdn, repeated)).status_code == 201
        assert len(await sim.transactions(ONEAPI, repeated)) == 2

        first = await sim.oneapi_charge("fr-lumiere", msisdn, repeated)
        second = await sim.oneapi_charge("fr-lumiere", msisdn, repeated)
        assert (first.status_code, second.status_code) == (201, 409)
        assert second.json()["requestError"]["serviceException"]["messageId"] == "SVC0005"
        assert len(await sim.transactions("fr-lumiere", repeated)) == 1


async def test_aggregators_follow_their_declared_dedup() -> None:
    msisdn = fresh_msisdn()
    carriers = base_carriers(ke_kilima={"deduplicates_by_key": "no"},
                             es_cobromovil={"deduplicates_by_key": "error"})
    async with running(carriers) as sim:
        repeated = key()
        body = {"merchant_tx_id": repeated, "msisdn": msisdn, "amount": "1.00",
                "currency": sim.carrier(POLLING).currency}
        for _ in range(2):
            assert (await sim.polling(POLLING, "POST", "charges", body)).status_code == 202
        assert len(await sim.transactions(POLLING, repeated)) == 2

        body = {"order_id": repeated, "msisdn": msisdn, "amount": "1.00",
                "currency": sim.carrier(CALLBACKS).currency, "callback_url": "http://127.0.0.1:9"}
        first = await sim.callbacks(CALLBACKS, "POST", "payments", body)
        second = await sim.callbacks(CALLBACKS, "POST", "payments", body)
        assert (first.status_code, second.status_code) == (202, 409)
        assert len(await sim.transactions(CALLBACKS, repeated)) == 1


async def test_camara_refuses_a_repeated_correlator_with_409() -> None:
    msisdn, repeated = fresh_msisdn(), key()
    async with running() as sim:
        body = sim.camara_payment(CAMARA, msisdn, repeated)
        assert (await sim.camara(CAMARA, "POST", "payments", body)).status_code == 201
        again = await sim.camara(CAMARA, "POST", "payments", body)
        assert again.status_code == 409
        assert again.json()["code"] == "ALREADY_EXISTS"
        assert len(await sim.transactions(CAMARA, repeated)) == 1


async def test_absent_status_lookup() -> None:
    msisdn = fresh_msisdn()
    async with running(base_carriers(fr_azur={"status_lookup": False})) as sim:
        charged = key()
        await sim.parlayx(PARLAYX_NO_PROMISES, "chargeAmount", msisdn, charged)
        reply = await sim.parlayx(PARLAYX_NO_PROMISES, "getAmountTransactionStatus", msisdn,
                                  charged)
        assert reply.status_code == 500
        assert "operation not supported" in reply.text and "Fault" in reply.text

        await sim.oneapi_charge(ONEAPI, msisdn, charged)
        looked_up = await sim.oneapi_lookup(ONEAPI, msisdn, charged)
        assert looked_up.status_code == 404
        assert looked_up.headers["content-type"].startswith("text/html")
        with pytest.raises(json.JSONDecodeError):
            json.loads(looked_up.text)


# -- faults --------------------------------------------------------------------------------------


async def test_commit_after_reply_hides_the_debit_from_lookups_and_dedup() -> None:
    msisdn, charged = fresh_msisdn(), key()
    async with running() as sim:
        await sim.fault(ONEAPI, "commit_after_reply", msisdn=msisdn, delay_seconds=0.6)
        assert (await sim.oneapi_charge(ONEAPI, msisdn, charged)).status_code == 201
        assert (await sim.oneapi_lookup(ONEAPI, msisdn, charged)).status_code == 404
        # a retry inside the window is not recognised: a real second debit
        assert (await sim.oneapi_charge(ONEAPI, msisdn, charged)).status_code == 201
        booked = await sim.transactions(ONEAPI, charged)
        assert len(booked) == 2 and not booked[0]["visible"]
        assert await sim.balance(ONEAPI, msisdn) == Decimal("97.00")
        await asyncio.sleep(0.7)
        assert (await sim.oneapi_lookup(ONEAPI, msisdn, charged)).status_code == 200


async def test_lookup_error_fails_count_lookups_then_recovers() -> None:
    msisdn, charged = fresh_msisdn(), key()
    async with running() as sim:
        await sim.oneapi_charge(ONEAPI, msisdn, charged)
        await sim.fault(ONEAPI, "lookup_error", count=2)
        assert (await sim.oneapi_lookup(ONEAPI, msisdn, charged)).status_code == 500
        # a look-up fault is not spent by a charge
        assert (await sim.oneapi_charge(ONEAPI, msisdn, key())).status_code == 201
        assert (await sim.oneapi_lookup(ONEAPI, msisdn, charged)).status_code == 500
        assert (await sim.oneapi_lookup(ONEAPI, msisdn, charged)).status_code == 200

        await sim.fault(POLLING, "lookup_error", status=401)
        body = {"merchant_tx_id": charged, "msisdn": msisdn, "amount": "1.00",
                "currency": sim.carrier(POLLING).currency}
        await sim.polling(POLLING, "POST", "charges", body)
        params = {"merchant_tx_id": charged}
        assert (await sim.polling(POLLING, "GET", "charges", params=params)).status_code == 401
        assert (await sim.polling(POLLING, "GET", "charges", params=params)).status_code == 200


async def test_fault_code_variant_refuses_with_the_carriers_own_code() -> None:
    msisdn = fresh_msisdn()
    async with running() as sim:
        await sim.fault(PARLAYX_NO_PROMISES, "fault_code_variant", msisdn=msisdn)
        reply = await sim.parlayx(PARLAYX_NO_PROMISES, "chargeAmount", msisdn, key())
        assert reply.status_code == 500
        assert "SVC0270" in reply.text and "insufficient balance" in reply.text

        await sim.fault(ONEAPI, "fault_code_variant", msisdn=msisdn)
        refused = await sim.oneapi_charge(ONEAPI, msisdn, key())
        assert refused.status_code == 400
        assert refused.json()["requestError"]["policyException"] == {
            "messageId": "POL0001", "text": "credit too low"}
        assert await sim.transactions(ONEAPI) == []
        assert await sim.transactions(PARLAYX_NO_PROMISES) == []


async def test_unavailable_for_refuses_everything_for_a_while() -> None:
    msisdn = fresh_msisdn()
    async with running() as sim:
        await sim.fault(ONEAPI, "unavailable_for", delay_seconds=0.5)
        assert (await sim.oneapi_charge(ONEAPI, msisdn, key())).status_code == 503
        assert (await sim.oneapi_lookup(ONEAPI, msisdn, key())).status_code == 503
        assert (await sim.oneapi_charge("fr-lumiere", msisdn, key())).status_code == 201
        assert await sim.transactions(ONEAPI) == []
        await asyncio.sleep(0.6)
        assert (await sim.oneapi_charge(ONEAPI, msisdn, key())).status_code == 201


async def test_rotated_credentials_refuse_the_old_secret_and_old_tokens() -> None:
    msisdn = fresh_msisdn()
    async with running() as sim:
        old = sim.carrier(ONEAPI).password
        await sim.control("credentials", {"carrier": ONEAPI, "password": "rotated-1"})
        assert (await sim.oneapi_charge(ONEAPI, msisdn, key(), password=old)).status_code == 401
        assert (await sim.oneapi_charge(ONEAPI, msisdn, key(),
                                        password="rotated-1")).status_code == 201

        carrier = sim.carrier(OAUTH_ONEAPI)
        issued_before = await sim._oneapi_auth(carrier, None)
        assert (await sim.oneapi_charge(OAUTH_ONEAPI, msisdn, key(),
                                        headers=issued_before)).status_code == 201
        await sim.control("credentials", {"carrier": OAUTH_ONEAPI, "password": "rotated-2"})
        assert (await sim.oneapi_charge(OAUTH_ONEAPI, msisdn, key(),
                                        headers=issued_before)).status_code == 401
        assert (await sim.oneapi_charge(OAUTH_ONEAPI, msisdn, key(),
                                        password=carrier.password)).status_code == 401
        assert (await sim.oneapi_charge(OAUTH_ONEAPI, msisdn, key(),
                                        password="rotated-2")).status_code == 201

        old = sim.carrier(PARLAYX_NO_PROMISES).password
        await sim.control("credentials", {"carrier": PARLAYX_NO_PROMISES, "password": "x"})
        reply = await sim.parlayx(PARLAYX_NO_PROMISES, "chargeAmount", msisdn, key(),
                                  password=old)
        assert reply.status_code == 500 and "wsse:FailedAuthentication" in reply.text
        assert (await sim.parlayx(PARLAYX_NO_PROMISES, "chargeAmount", msisdn, key(),
                                  password="x")).status_code == 200


async def _callback_charge(sim: Sim, rec: Receiver, msisdn: str, order: str) -> None:
    reply = await sim.callbacks(CALLBACKS, "POST", "payments", {
        "order_id": order, "msisdn": msisdn, "amount": "1.00",
        "currency": sim.carrier(CALLBACKS).currency,
        "callback_url": f"{rec.url}/callbacks/{CALLBACKS}"})
    assert reply.status_code == 202


async def test_late_callback_arrives_after_the_delay() -> None:
    msisdn = fresh_msisdn()
    async with running() as sim, receiver() as rec:
        await sim.fault(CALLBACKS, "late_callback", msisdn=msisdn, delay_seconds=1.0)
        sent = time.monotonic()
        await _callback_charge(sim, rec, msisdn, key())
        await asyncio.sleep(0.5)
        assert rec.received == []
        [arrived] = await rec.wait_for(1)
        assert arrived.at - sent >= 1.0
        assert signed_by(sim.carrier(CALLBACKS).callback_secret, arrived)


async def test_forged_callback_says_the_opposite_with_a_wrong_key() -> None:
    msisdn, order = fresh_msisdn(), key()
    async with running() as sim, receiver() as rec:
        await sim.fault(CALLBACKS, "forged_callback", msisdn=msisdn)
        await _callback_charge(sim, rec, msisdn, order)
        forged, genuine = await rec.wait_for(2)
        secret = sim.carrier(CALLBACKS).callback_secret
        assert not signed_by(secret, forged)
        assert json.loads(forged.body)["status"] == "failed"
        assert json.loads(forged.body)["reason"] == "insufficient_funds"
        assert signed_by(secret, genuine) and json.loads(genuine.body)["status"] == "completed"
        assert len(await sim.transactions(CALLBACKS, order)) == 1  # the charge did happen


async def test_foreign_callback_goes_to_another_carrier_with_its_valid_key() -> None:
    msisdn, order = fresh_msisdn(), key()
    async with running() as sim, receiver() as rec:
        other = sim.core.other_carrier(sim.carrier(CALLBACKS))
        assert other is not None
        await sim.fault(CALLBACKS, "foreign_callback", msisdn=msisdn)
        await _callback_charge(sim, rec, msisdn, order)
        [arrived] = await rec.wait_for(1)
        await asyncio.sleep(0.3)
        assert len(rec.received) == 1  # nothing to our own URL
        assert arrived.path == f"/callbacks/{other.carrier_id}"
        assert signed_by(other.callback_secret, arrived)
        assert json.loads(arrived.body)["order_id"] == order


async def test_camara_forged_and_foreign_events() -> None:
    msisdn = fresh_msisdn()
    async with running() as sim, receiver() as rec:
        carrier = sim.carrier(CAMARA)
        other = sim.core.other_carrier(carrier)
        assert other is not None
        forged_key, foreign_key = key(), key()
        await sim.fault(CAMARA, "forged_callback", msisdn=msisdn)
        body = sim.camara_payment(CAMARA, msisdn, forged_key,
                                  f"{rec.url}/callbacks/{CAMARA}/{forged_key}")
        assert (await sim.camara(CAMARA, "POST", "payments", body)).status_code == 201
        forged, genuine = await rec.wait_for(2)
        assert forged.headers["Authorization"] != (
            f"Bearer {sink_token(carrier.callback_secret, forged_key)}")
        assert json.loads(forged.body)["data"]["status"] == "failed"
        assert genuine.headers["Authorization"] == (
            f"Bearer {sink_token(carrier.callback_secret, forged_key)}")
        assert json.loads(genuine.body)["data"]["status"] == "succeeded"

        await sim.fault(CAMARA, "foreign_callback", msisdn=msisdn)
        body = sim.camara_payment(CAMARA, msisdn, foreign_key,
                                  f"{rec.url}/callbacks/{CAMARA}/{foreign_key}")
        assert (await sim.camara(CAMARA, "POST", "payments", body)).status_code == 201
        received = await rec.wait_for(3)
        assert received[2].path == f"/callbacks/{other.carrier_id}/{foreign_key}"
        assert received[2].headers["Authorization"] == (
            f"Bearer {sink_token(other.callback_secret, foreign_key)}")


async def test_control_callback_sends_what_it_is_told() -> None:
    msisdn, order = fresh_msisdn(), key()
    async with running() as sim, receiver() as rec:
        await sim.fault(CALLBACKS, "no_callback", msisdn=msisdn)
        await _callback_charge(sim, rec, msisdn, order)
        other = sim.core.other_carrier(sim.carrier(CALLBACKS))
        assert other is not None
        sent = await sim.control("callback", {"carrier": CALLBACKS, "key": order,
                                              "outcome": "insufficient_funds",
                                              "sign_as": other.carrier_id})
        assert sent["status"] == 200
        [arrived] = await rec.wait_for(1)
        assert arrived.path == f"/callbacks/{CALLBACKS}"
        assert signed_by(other.callback_secret, arrived)
        assert json.loads(arrived.body)["reason"] == "insufficient_funds"
        assert json.loads(arrived.body)["payment_id"] == (
            await sim.transactions(CALLBACKS, order))[0]["serverReferenceCode"]

        sent = await sim.control("callback", {"carrier": CALLBACKS, "key": order,
                                              "outcome": "success", "to": other.carrier_id})
        assert sent["url"].endswith(f"/callbacks/{other.carrier_id}")
        [_, second] = await rec.wait_for(2)
        assert signed_by(sim.carrier(CALLBACKS).callback_secret, second)


def test_books_hold_key_kind_amount_and_currency() -> None:
    core = SimulatorCore(base_carriers(), Decimal("10"))
    book = core.books[ONEAPI]
    charge = book.charge("+33600000001", Decimal("1.25"), "our-key", "REF")
    book.refund("+33600000001", Decimal("1.25"), "our-refund-key", "REF", charge.server_reference)
    rows = book.snapshot()["transactions"]
    assert [(t["clientCorrelator"], t["kind"], t["amount"], t["currency"])
            for t in rows] == [
        ("our-key", "charge", "1.25", "EUR"), ("our-refund-key", "refund", "1.25", "EUR")]
