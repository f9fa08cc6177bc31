"""What every carrier simulator shares: carriers and their credentials, books, injected faults,
the control API (/_control/...) tests and the demo use, and the authentication checks."""

from __future__ import annotations

import asyncio
import base64
import random
import secrets as pysecrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import NoReturn

import aiohttp
from aiohttp import web

from simulators.books import CarrierBook

FAULT_KINDS = {
    "latency",  # answer normally after delay_seconds
    "error_503",  # refuse without debiting
    "error_500",  # fail without debiting (the client cannot know that)
    "timeout_after_debit",  # debit, then answer only after delay_seconds
    "reset_after_debit",  # debit, then drop the connection without answering
    "insufficient_funds",  # refuse as out of credit whatever the balance
    "malformed",  # answer with a body that cannot be parsed, without debiting
    "throttle",  # refuse with 429 and Retry-After: delay_seconds, without debiting
    "no_callback",  # callback carriers: never deliver the result
    "duplicate_callback",  # callback carriers: deliver the result twice
}
TOKEN_LIFETIME_SECONDS = 300


@dataclass(frozen=True)
class SimCarrier:
    carrier_id: str
    protocol: str
    currency: str
    username: str
    password: str
    auth_kind: str = "basic"
    # protocol-specific switches (e.g. OneAPI gateways that echo odd types)
    options: frozenset[str] = frozenset()
    # the key callbacks to us are signed with
    callback_secret: str = ""


@dataclass
class Fault:
    carrier_id: str
    msisdn: str | None
    kind: str
    remaining: int
    delay_seconds: float = 0.0


@dataclass(frozen=True)
class TakenFault:
    kind: str
    delay: float


@dataclass
class SimulatorCore:
    carriers: dict[str, SimCarrier]
    default_balance: Decimal = Decimal("100")
    chaos_rate: float = 0.0
    seed: int | None = None
    books: dict[str, CarrierBook] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self.reset()

    def reset(self) -> None:
        self.books = {
            c.carrier_id: CarrierBook(c.carrier_id, c.currency, self.default_balance)
            for c in self.carriers.values()
        }
        self.faults = []

    def carrier(self, request: web.Request, protocol: str) -> SimCarrier:
        carrier = self.carriers.get(request.match_info["carrier"])
        if carrier is None or carrier.protocol != protocol:
            raise web.HTTPNotFound(text="no such carrier")
        return carrier

    def take_fault(self, carrier_id: str, msisdn: str) -> TakenFault | None:
        for fault in self.faults:
            if fault.carrier_id == carrier_id and fault.msisdn in (None, msisdn):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                return TakenFault(fault.kind, fault.delay_seconds)
        if self.chaos_rate and self._random.random() < self.chaos_rate:
            kind = self._random.choice(["error_503", "reset_after_debit", "latency"])
            return TakenFault(kind, 0.5)
        return None

    # -- authentication --------------------------------------------------------------------

    @staticmethod
    def basic_ok(header: str, username: str, password: str) -> bool:
        if not header.startswith("Basic "):
            return False
        try:
            user, _, given = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return pysecrets.compare_digest(user, username) and pysecrets.compare_digest(
            given, password)

    def bearer_ok(self, header: str, carrier: SimCarrier) -> bool:
        owner = self.tokens.get(header.removeprefix("Bearer ")) if header.startswith(
            "Bearer ") else None
        return owner is not None and owner[0] == carrier.carrier_id and owner[1] > time.time()

    def http_auth_ok(self, request: web.Request, carrier: SimCarrier) -> bool:
        header = request.headers.get("Authorization", "")
        if carrier.auth_kind == "oauth2":
            return self.bearer_ok(header, carrier)
        return self.basic_ok(header, carrier.username, carrier.password)

    async def token(self, request: web.Request) -> web.Response:
        carrier = self.carriers.get(request.match_info["carrier"])
        if carrier is None or carrier.auth_kind != "oauth2":
            raise web.HTTPNotFound()
        form = await request.post()
        header = request.headers.get("Authorization", "")
        if form.get("grant_type") != "client_credentials" or not self.basic_ok(
                header, carrier.username, carrier.password):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = pysecrets.token_urlsafe(24)
        self.tokens[token] = (carrier.carrier_id, time.time() + TOKEN_LIFETIME_SECONDS)
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "expires_in": TOKEN_LIFETIME_SECONDS})

    # -- control API -------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/{carrier}/oauth/token", self.token)
        app.router.add_get("/_control/health", self.health)
        app.router.add_get("/_control/books", self.get_books)
        app.router.add_post("/_control/accounts", self.set_account)
        app.router.add_post("/_control/faults", self.add_fault)
        app.router.add_post("/_control/reset", self.reset_books)

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "carriers": sorted(self.carriers)})

    async def get_books(self, request: web.Request) -> web.Response:
        wanted = request.query.get("carrier")
        return web.json_response(
            {cid: book.snapshot() for cid, book in self.books.items() if wanted in (None, cid)})

    async def set_account(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("carrier") not in self.books:
            raise web.HTTPBadRequest(text=f"unknown carrier {body.get('carrier')!r}")
        self.books[body["carrier"]].account(body["msisdn"]).balance = Decimal(str(body["balance"]))
        return web.json_response({"ok": True})

    async def add_fault(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("kind") not in FAULT_KINDS or body.get("carrier") not in self.carriers:
            raise web.HTTPBadRequest(text=f"unknown fault or carrier: {body}")
        self.faults.append(Fault(body["carrier"], body.get("msisdn"), body["kind"],
                                 int(body.get("count", 1)), float(body.get("delay_seconds", 0))))
        return web.json_response({"ok": True})

    async def reset_books(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


def drop_connection(request: web.Request) -> NoReturn:
    """Closes the socket without an answer: the client cannot tell what happened."""
    if request.transport is not None:
        request.transport.close()
    raise asyncio.CancelledError()


async def post_callback(url: str, body: bytes, headers: dict[str, str]) -> bool:
    """Delivers one callback; a lost one is the client's to recover by looking the result up."""
    try:
        async with aiohttp.ClientSession() as session, session.post(
                url, data=body, headers={"Content-Type": "application/json", **headers},
                timeout=aiohttp.ClientTimeout(total=10)) as reply:
            await reply.read()
            return reply.status < 300
    except (aiohttp.ClientError, TimeoutError):
        return False


async def refuse_before_debit(fault: TakenFault | None,
                              malformed: Callable[[], web.Response]) -> web.Response | None:
    """The faults that strike before any money moves, alike for every HTTP carrier: a slow
    answer (then carry on), 503, 429 with Retry-After, 500, or the family's malformed reply."""
    if fault is None:
        return None
    if fault.kind == "latency":
        await asyncio.sleep(fault.delay)
    elif fault.kind == "error_503":
        return web.json_response({"error": "unavailable"}, status=503,
                                 headers={"Retry-After": "1"})
    elif fault.kind == "throttle":
        return web.json_response({"error": "too many requests"}, status=429,
                                 headers={"Retry-After": str(int(fault.delay) or 1)})
    elif fault.kind == "error_500":
        return web.Response(status=500, text="internal error")
    elif fault.kind == "malformed":
        return malformed()
    return None


async def lose_answer_after_debit(request: web.Request, fault: TakenFault | None) -> None:
    """The faults that strike after the debit: answer too late, or not at all."""
    if fault is None:
        return
    if fault.kind == "timeout_after_debit":
        await asyncio.sleep(fault.delay)
    elif fault.kind == "reset_after_debit":
        drop_connection(request)
