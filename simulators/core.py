"""What every carrier simulator shares: carriers and their credentials, books, injected faults,
the control API (/_control/...) tests and the demo use, and the authentication checks."""

from __future__ import annotations

import asyncio
import base64
import random
import secrets as pysecrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
from aiohttp import web

from simulators.books import CarrierBook
from simulators.store import StateStore

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
    # debit and answer success, but look-ups (and deduplication) see the transaction only
    # after delay_seconds: a repeat within that window is a second debit
    "commit_after_reply",
    # refuse as out of credit (whatever the balance, no debit) with a code this carrier uses
    # that is not its family's standard one; "code" and "text" override the family's default
    "fault_code_variant",
    "late_callback",  # callback carriers: deliver the true result after delay_seconds
    # callback carriers: also deliver, first, the opposite result signed with a wrong key
    "forged_callback",
    # callback carriers: deliver the true result to another carrier of the same family's
    # callback URL, signed with that carrier's valid key, instead of to ours
    "foreign_callback",
    # the look-up operation fails ("status": 500 by default, or 401) for count look-ups
    "lookup_error",
    # every request for this carrier answers 503 (no debit) for delay_seconds of wall time
    "unavailable_for",
}
LOOKUP_FAULTS = {"lookup_error"}
CALLBACK_OUTCOMES = {"success", "insufficient_funds", "failed"}
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
    # what the carrier promises (carriers.loader.CarrierPromises), and so does:
    # a repeated key is "no" a new debit, "replay" the first answer, "error" refused
    deduplicates_by_key: str = "replay"
    # whether the family's look-up by our key exists at all
    status_lookup: bool = True


@dataclass
class Fault:
    carrier_id: str
    msisdn: str | None
    kind: str
    remaining: int
    delay_seconds: float = 0.0
    status: int | None = None
    code: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class TakenFault:
    kind: str
    delay: float
    status: int | None = None
    code: str | None = None
    text: str | None = None

    def visible_at(self) -> float:
        """When a transaction debited under this fault becomes visible to look-ups."""
        return time.time() + self.delay if self.kind == "commit_after_reply" else 0.0


CallbackSender = Callable[[SimCarrier, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass
class SimulatorCore:
    carriers: dict[str, SimCarrier]
    default_balance: Decimal = Decimal("100")
    chaos_rate: float = 0.0
    seed: int | None = None
    books: dict[str, CarrierBook] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    # a SQLite file (or a directory for one) that keeps the books and the families' records
    # across restarts; None keeps everything in memory
    state_path: Path | None = None

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._registered = dict(self.carriers)  # the credentials a reset goes back to
        self.store = StateStore(self.state_path) if self.state_path is not None else None
        self.unavailable_until: dict[str, float] = {}
        self.reset_hooks: list[Callable[[], None]] = []
        self.callback_senders: dict[str, CallbackSender] = {}
        self._counters: dict[str, int] = {}
        if self.store is not None:
            for carrier_id, password in self.store.passwords().items():
                if carrier_id in self.carriers:
                    self.carriers[carrier_id] = replace(self.carriers[carrier_id],
                                                        password=password)
        self._open_books()

    def _open_books(self) -> None:
        self.books = {
            c.carrier_id: CarrierBook(c.carrier_id, c.currency, self.default_balance, self.store)
            for c in self.carriers.values()
        }

    def reset(self) -> None:
        """Forgets everything, durable state included: books, records, faults, tokens, and
        rotated credentials."""
        if self.store is not None:
            self.store.clear()
        self.carriers.clear()
        self.carriers.update(self._registered)
        self._open_books()
        self.faults = []
        self.tokens.clear()
        self.unavailable_until.clear()
        self._counters.clear()
        for hook in self.reset_hooks:
            hook()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    # -- durable records for the families ------------------------------------------------------

    def atomic(self) -> AbstractContextManager[None]:
        return self.store.atomic() if self.store is not None else nullcontext()

    def save_record(self, family: str, record_id: str, data: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.save_record(family, record_id, data)

    def records(self, family: str) -> list[dict[str, Any]]:
        return self.store.records(family) if self.store is not None else []

    def next_id(self, name: str) -> int:
        if self.store is not None:
            return self.store.next_id(name)
        self._counters[name] = self._counters.get(name, 0) + 1
        return self._counters[name]

    # -- carriers and faults -------------------------------------------------------------------

    def carrier(self, request: web.Request, protocol: str) -> SimCarrier:
        carrier = self.carriers.get(request.match_info["carrier"])
        if carrier is None or carrier.protocol != protocol:
            raise web.HTTPNotFound(text="no such carrier")
        self.refuse_if_unavailable(carrier.carrier_id)
        return carrier

    def unavailable(self, carrier_id: str) -> bool:
        until = self.unavailable_until.get(carrier_id)
        if until is None:
            return False
        if time.time() >= until:
            del self.unavailable_until[carrier_id]
            return False
        return True

    def refuse_if_unavailable(self, carrier_id: str) -> None:
        if self.unavailable(carrier_id):
            raise web.HTTPServiceUnavailable(
                text="<html><body><h1>503 Service Unavailable</h1></body></html>",
                content_type="text/html", headers={"Retry-After": "1"})

    def take_fault(self, carrier_id: str, msisdn: str) -> TakenFault | None:
        """The fault for one money-moving request (never a look-up fault)."""
        if self.unavailable(carrier_id):
            return TakenFault("error_503", 0.0)
        for fault in self.faults:
            if (fault.carrier_id == carrier_id and fault.msisdn in (None, msisdn)
                    and fault.kind not in LOOKUP_FAULTS):
                return self._take(fault)
        if self.chaos_rate and self._random.random() < self.chaos_rate:
            kind = self._random.choice(["error_503", "reset_after_debit", "latency"])
            return TakenFault(kind, 0.5)
        return None

    def take_lookup_fault(self, carrier_id: str) -> TakenFault | None:
        """The fault for one look-up by key (look-ups seldom know the MSISDN: any matches)."""
        for fault in self.faults:
            if fault.carrier_id == carrier_id and fault.kind in LOOKUP_FAULTS:
                return self._take(fault)
        return None

    def _take(self, fault: Fault) -> TakenFault:
        fault.remaining -= 1
        if fault.remaining <= 0:
            self.faults.remove(fault)
        return TakenFault(fault.kind, fault.delay_seconds, fault.status, fault.code, fault.text)

    def other_carrier(self, carrier: SimCarrier) -> SimCarrier | None:
        """Another carrier of the same family that signs callbacks (for foreign callbacks)."""
        return next((c for cid, c in sorted(self.carriers.items())
                     if cid != carrier.carrier_id and c.protocol == carrier.protocol
                     and c.callback_secret), None)

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
        self.refuse_if_unavailable(carrier.carrier_id)
        form = await request.post()
        header = request.headers.get("Authorization", "")
        if form.get("grant_type") != "client_credentials" or not self.basic_ok(
                header, carrier.username, carrier.password):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = pysecrets.token_urlsafe(24)
        self.tokens[token] = (carrier.carrier_id, time.time() + TOKEN_LIFETIME_SECONDS)
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "expires_in": TOKEN_LIFETIME_SECONDS})

    def rotate_password(self, carrier_id: str, password: str) -> None:
        """The carrier changes the secret it accepts; tokens issued before stop working."""
        self.carriers[carrier_id] = replace(self.carriers[carrier_id], password=password)
        for token, (owner, _) in list(self.tokens.items()):
            if owner == carrier_id:
                del self.tokens[token]
        if self.store is not None:
            self.store.save_password(carrier_id, password)

    # -- control API -------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/{carrier}/oauth/token", self.token)
        app.router.add_get("/_control/health", self.health)
        app.router.add_get("/_control/books", self.get_books)
        app.router.add_post("/_control/accounts", self.set_account)
        app.router.add_post("/_control/faults", self.add_fault)
        app.router.add_post("/_control/reset", self.reset_books)
        app.router.add_post("/_control/credentials", self.set_credentials)
        app.router.add_post("/_control/callback", self.send_callback)

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "carriers": sorted(self.carriers),
                                  "durable": self.store is not None})

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
        delay = float(body.get("delay_seconds", 0))
        if body["kind"] == "unavailable_for":  # bounded by time, not by count
            self.unavailable_until[body["carrier"]] = time.time() + delay
            return web.json_response({"ok": True})
        status = body.get("status")
        self.faults.append(Fault(body["carrier"], body.get("msisdn"), body["kind"],
                                 int(body.get("count", 1)), delay,
                                 int(status) if status is not None else None,
                                 body.get("code"), body.get("text")))
        return web.json_response({"ok": True})

    async def reset_books(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def set_credentials(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("carrier") not in self.carriers or not isinstance(body.get("password"), str):
            raise web.HTTPBadRequest(text=f"unknown carrier or no password: {body}")
        self.rotate_password(body["carrier"], body["password"])
        return web.json_response({"ok": True})

    async def send_callback(self, request: web.Request) -> web.Response:
        """Sends one callback now, e.g. a forged or foreign one: {"carrier", "key", "outcome"
        (success | insufficient_funds | failed), optional "sign_as" (a carrier id whose key
        signs it; default the carrier itself), "secret" (sign with this key instead), "to" (the
        carrier id whose callback URL receives it; default the carrier), "url" (instead)}."""
        body = await request.json()
        carrier = self.carriers.get(str(body.get("carrier")))
        sender = self.callback_senders.get(carrier.protocol) if carrier else None
        if carrier is None or sender is None or body.get("outcome") not in CALLBACK_OUTCOMES \
                or not body.get("key"):
            raise web.HTTPBadRequest(text=f"no callbacks for this carrier, or bad body: {body}")
        for field_name in ("sign_as", "to"):
            if body.get(field_name) is not None and body[field_name] not in self.carriers:
                raise web.HTTPBadRequest(text=f"unknown carrier in {field_name}")
        return web.json_response(await sender(carrier, body))

    def callback_target(self, carrier: SimCarrier, body: dict[str, Any],
                        known_url: str | None) -> tuple[str, str]:
        """(url, signing secret) for an on-demand callback."""
        signer = self.carriers[body.get("sign_as") or carrier.carrier_id]
        secret = str(body["secret"]) if body.get("secret") else signer.callback_secret
        url = body.get("url") or known_url
        if not url:
            raise web.HTTPBadRequest(text="no callback URL known for this key: give 'url'")
        if body.get("to"):
            url = retarget(str(url), carrier.carrier_id, str(body["to"]))
        return str(url), secret


def retarget(url: str, carrier_id: str, other_id: str) -> str:
    """The same callback URL, but another carrier's: /callbacks/<carrier> -> /callbacks/<other>."""
    return url.replace(f"/callbacks/{carrier_id}", f"/callbacks/{other_id}", 1)


def wrong_key() -> str:
    return pysecrets.token_hex(16)


def lookup_absent() -> web.Response:
    """What a gateway answers for an operation it does not have: a 404 page, not JSON."""
    return web.Response(status=404, text="<html><body><h1>404 Not Found</h1></body></html>",
                        content_type="text/html")


def drop_connection(request: web.Request) -> NoReturn:
    """Closes the socket without an answer: the client cannot tell what happened."""
    if request.transport is not None:
        request.transport.close()
    raise asyncio.CancelledError()


async def deliver(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POSTs one callback; the receiver's HTTP status, or 0 when it could not be reached."""
    try:
        async with aiohttp.ClientSession() as session, session.post(
                url, data=body, headers={"Content-Type": "application/json", **headers},
                timeout=aiohttp.ClientTimeout(total=10)) as reply:
            await reply.read()
            return reply.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def post_callback(url: str, body: bytes, headers: dict[str, str]) -> bool:
    """Delivers one callback; a lost one is the client's to recover by looking the result up."""
    return 0 < await deliver(url, body, headers) < 300


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
