"""A GSMA OneAPI Payment carrier simulator: a real HTTP server keeping its own books.

Carrier endpoints:  POST /{carrier}/payment/v1/{endUserId}/transactions/amount  (JSON or form)
Control endpoints:  GET /_control/books, POST /_control/accounts, POST /_control/faults,
                    POST /_control/reset, GET /_control/health
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import secrets as pysecrets
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from simulators.books import CarrierBook, InsufficientFunds, RefundRefused

FAULT_KINDS = {
    "latency",  # answer normally after delay_seconds
    "error_503",  # refuse without debiting
    "error_500",  # fail without debiting (the client cannot know that)
    "timeout_after_debit",  # debit, then answer only after delay_seconds
    "reset_after_debit",  # debit, then drop the connection without answering
    "insufficient_funds",  # refuse with POL1000 whatever the balance
    "malformed",  # answer 201 with a body that is not JSON, without debiting
    "throttle",  # refuse with 429 and Retry-After: delay_seconds, without debiting
}
TOKEN_LIFETIME_SECONDS = 300


@dataclass
class Fault:
    carrier_id: str
    msisdn: str | None
    kind: str
    remaining: int
    delay_seconds: float = 0.0


@dataclass(frozen=True)
class SimCarrier:
    carrier_id: str
    currency: str
    username: str
    password: str
    auth_kind: str = "basic"
    # some gateways echo `description` as a list and `amount` as a number
    quirky_echo: bool = False


def _request_error(status: int, kind: str, message_id: str, text: str) -> web.Response:
    return web.json_response(
        {"requestError": {kind: {"messageId": message_id, "text": text}}}, status=status
    )


class OneApiSimulator:
    def __init__(
        self,
        carriers: list[SimCarrier],
        default_balance: Decimal = Decimal("100"),
        chaos_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.carriers = {c.carrier_id: c for c in carriers}
        self.default_balance = default_balance
        self.chaos_rate = chaos_rate
        self._random = random.Random(seed)
        self.books: dict[str, CarrierBook] = {}
        self.faults: list[Fault] = []
        self.requests_seen = 0
        self.tokens: dict[str, tuple[str, float]] = {}
        self.reset()

    def reset(self) -> None:
        self.books = {
            c.carrier_id: CarrierBook(c.carrier_id, c.currency, self.default_balance)
            for c in self.carriers.values()
        }
        self.faults = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{carrier}/payment/v1/{end_user}/transactions/amount", self.amount)
        app.router.add_get("/{carrier}/payment/v1/{end_user}/transactions/amount", self.lookup)
        app.router.add_post("/{carrier}/oauth/token", self.token)
        app.router.add_get("/_control/health", self.health)
        app.router.add_get("/_control/books", self.get_books)
        app.router.add_post("/_control/accounts", self.set_account)
        app.router.add_post("/_control/faults", self.add_fault)
        app.router.add_post("/_control/reset", self.reset_books)
        return app

    # -- control -------------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "carriers": sorted(self.carriers)})

    async def get_books(self, request: web.Request) -> web.Response:
        wanted = request.query.get("carrier")
        return web.json_response(
            {cid: book.snapshot() for cid, book in self.books.items() if wanted in (None, cid)}
        )

    async def set_account(self, request: web.Request) -> web.Response:
        body = await request.json()
        book = self.books[body["carrier"]]
        book.account(body["msisdn"]).balance = Decimal(str(body["balance"]))
        return web.json_response({"ok": True})

    async def add_fault(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["kind"] not in FAULT_KINDS or body["carrier"] not in self.carriers:
            raise web.HTTPBadRequest(text=f"unknown fault or carrier: {body}")
        self.faults.append(
            Fault(body["carrier"], body.get("msisdn"), body["kind"], int(body.get("count", 1)),
                  float(body.get("delay_seconds", 0)))
        )
        return web.json_response({"ok": True})

    async def reset_books(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    # -- the carrier API -----------------------------------------------------------------

    def _take_fault(self, carrier_id: str, msisdn: str) -> str | None:
        for fault in self.faults:
            if fault.carrier_id == carrier_id and fault.msisdn in (None, msisdn):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                return f"{fault.kind}:{fault.delay_seconds}"
        if self.chaos_rate and self._random.random() < self.chaos_rate:
            return self._random.choice(["error_503:0", "reset_after_debit:0", "latency:0.5"])
        return None

    def _basic_ok(self, request: web.Request, carrier: SimCarrier) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return pysecrets.compare_digest(user, carrier.username) and pysecrets.compare_digest(
            password, carrier.password
        )

    def _authorised(self, request: web.Request, carrier: SimCarrier) -> bool:
        if carrier.auth_kind == "basic":
            return self._basic_ok(request, carrier)
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ")
        owner = self.tokens.get(token) if header.startswith("Bearer ") else None
        return owner is not None and owner[0] == carrier.carrier_id and owner[1] > time.time()

    async def token(self, request: web.Request) -> web.Response:
        carrier = self.carriers.get(request.match_info["carrier"])
        if carrier is None or carrier.auth_kind != "oauth2":
            raise web.HTTPNotFound()
        form = await request.post()
        if form.get("grant_type") != "client_credentials" or not self._basic_ok(request, carrier):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = pysecrets.token_urlsafe(24)
        self.tokens[token] = (carrier.carrier_id, time.time() + TOKEN_LIFETIME_SECONDS)
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "expires_in": TOKEN_LIFETIME_SECONDS})

    async def lookup(self, request: web.Request) -> web.Response:
        """Status by clientCorrelator: how a client settles an operation it got no answer to."""
        carrier = self.carriers.get(request.match_info["carrier"])
        if carrier is None:
            raise web.HTTPNotFound()
        if not self._authorised(request, carrier):
            return _request_error(401, "policyException", "POL0001", "authentication failed")
        msisdn = unquote(request.match_info["end_user"]).removeprefix("tel:")
        txn = self.books[carrier.carrier_id].by_correlator.get(
            request.query.get("clientCorrelator", ""))
        if txn is None or txn.msisdn != msisdn:
            return _request_error(404, "serviceException", "SVC0004", "no such transaction")
        status = "Charged" if txn.kind == "charge" else "Refunded"
        return web.json_response({"amountTransaction": {
            "clientCorrelator": txn.client_correlator, "endUserId": f"tel:{msisdn}",
            "serverReferenceCode": txn.server_reference, "transactionOperationStatus": status,
            "paymentAmount": {"chargingInformation": {"amount": str(txn.amount),
                                                      "currency": txn.currency}},
        }})

    async def _read_transaction(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/x-www-form-urlencoded":
            form = await request.post()
            return {
                "clientCorrelator": form.get("clientCorrelator"),
                "endUserId": form.get("endUserId"),
                "referenceCode": form.get("referenceCode"),
                "transactionOperationStatus": form.get("transactionOperationStatus"),
                "originalServerReferenceCode": form.get("originalServerReferenceCode"),
                "paymentAmount": {
                    "chargingInformation": {
                        "amount": form.get("amount"),
                        "currency": form.get("currency"),
                        "description": form.get("description"),
                    }
                },
            }
        body = await request.json()
        transaction = body.get("amountTransaction")
        if not isinstance(transaction, dict):
            raise ValueError("amountTransaction missing")
        return transaction

    def _echo(self, request: web.Request, carrier: SimCarrier, txn_in: dict[str, Any],
              server_ref: str, status: str) -> web.Response:
        echoed = dict(txn_in)
        if carrier.quirky_echo:
            info = dict(echoed["paymentAmount"]["chargingInformation"])
            info["description"] = [info.get("description", "")]
            info["amount"] = float(info["amount"])
            echoed["paymentAmount"] = {"chargingInformation": info}
        echoed["serverReferenceCode"] = server_ref
        echoed["transactionOperationStatus"] = status
        echoed["resourceURL"] = f"{request.url.with_query(None)}/{server_ref}"
        return web.json_response({"amountTransaction": echoed}, status=201)

    async def amount(self, request: web.Request) -> web.StreamResponse:
        self.requests_seen += 1
        carrier = self.carriers.get(request.match_info["carrier"])
        if carrier is None:
            raise web.HTTPNotFound()
        if not self._authorised(request, carrier):
            return _request_error(401, "policyException", "POL0001", "authentication failed")
        book = self.books[carrier.carrier_id]
        try:
            txn_in = await self._read_transaction(request)
            msisdn = unquote(request.match_info["end_user"]).removeprefix("tel:")
            info = txn_in["paymentAmount"]["chargingInformation"]
            amount = Decimal(str(info["amount"]))
            currency = str(info["currency"])
            correlator = str(txn_in["clientCorrelator"])
            operation = str(txn_in["transactionOperationStatus"])
        except (ValueError, KeyError, TypeError, InvalidOperation, json.JSONDecodeError) as exc:
            return _request_error(400, "serviceException", "SVC0002", f"invalid input: {exc}")
        if currency != carrier.currency or amount <= 0:
            return _request_error(400, "serviceException", "SVC0002", "invalid amount or currency")

        previous = book.by_correlator.get(correlator)
        if previous is not None:
            same = previous.msisdn == msisdn and previous.amount == amount
            if not same:
                return _request_error(409, "serviceException", "SVC0005", "correlator reused")
            status = "Charged" if previous.kind == "charge" else "Refunded"
            return self._echo(request, carrier, txn_in, previous.server_reference, status)

        fault = self._take_fault(carrier.carrier_id, msisdn)
        kind, _, delay_text = (fault or "").partition(":")
        delay = float(delay_text or 0)
        if kind == "latency":
            await asyncio.sleep(delay)
        elif kind == "error_503":
            return web.json_response({"error": "unavailable"}, status=503,
                                     headers={"Retry-After": "1"})
        elif kind == "error_500":
            return web.Response(status=500, text="internal error")
        elif kind == "insufficient_funds":
            return _request_error(400, "policyException", "POL1000", "insufficient credit")
        elif kind == "malformed":
            return web.Response(status=201, text="<html>gateway says hello</html>")
        elif kind == "throttle":
            return web.json_response({"error": "too many requests"}, status=429,
                                     headers={"Retry-After": str(int(delay) or 1)})

        reference = str(txn_in.get("referenceCode", ""))
        try:
            if operation == "Charged":
                txn = book.charge(msisdn, amount, correlator, reference)
            elif operation == "Refunded":
                txn = book.refund(msisdn, amount, correlator, reference,
                                  str(txn_in.get("originalServerReferenceCode", "")))
            else:
                return _request_error(400, "serviceException", "SVC0002",
                                      f"unsupported operation {operation}")
        except InsufficientFunds:
            return _request_error(400, "policyException", "POL1000", "insufficient credit")
        except RefundRefused as exc:
            return _request_error(400, "serviceException", "SVC0270", str(exc))

        if kind == "timeout_after_debit":
            await asyncio.sleep(delay)
        elif kind == "reset_after_debit":
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError()
        return self._echo(request, carrier, txn_in, txn.server_reference, operation)


def carriers_from_registry(carrier_secrets: dict[str, str]) -> list[SimCarrier]:
    from carriers.loader import default_registry

    registry = default_registry()
    return [
        SimCarrier(c.id, registry.currency_of(c.id), c.auth.username,
                   carrier_secrets.get(c.auth.secret_ref, ""), c.auth.kind,
                   quirky_echo=c.request_format == "form")
        for c in registry.carriers.values()
        if c.protocol == "oneapi"
    ]


async def start_simulator(
    simulator: OneApiSimulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Starts the server in the running loop; returns the runner and the port bound."""
    runner = web.AppRunner(simulator.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None and server.sockets  # type: ignore[attr-defined]
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, int(bound)


def main() -> None:
    from settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--default-balance", default="100")
    parser.add_argument("--chaos-rate", type=float, default=0.0,
                        help="share of requests that meet a random fault")
    args = parser.parse_args()
    settings = get_settings()
    secrets = {k: v.get_secret_value() for k, v in settings.carrier_secrets.items()}
    simulator = OneApiSimulator(carriers_from_registry(secrets), Decimal(args.default_balance),
                                args.chaos_rate)
    web.run_app(simulator.app(), host=args.host, port=args.port, access_log=None,
                print=lambda *_: None)


if __name__ == "__main__":
    main()
