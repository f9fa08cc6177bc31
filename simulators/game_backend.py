"""The game backend that grants what was paid for: a real HTTP server on 127.0.0.1 with its own
books of entitlements, idempotent by grant id, and faults to inject.

    python -m simulators.game_backend --port 8703 [--token TOKEN]

API (``Authorization: Bearer <token>``):

* ``POST /entitlements`` {grant_id, subscriber_ref, sku, quantity | until (ISO, with offset)}:
  201 with the entitlement; the same grant id and terms again: 200 with the same entitlement;
  the same grant id with other terms: 409; a closed account: 422 {"error": "account_closed"}.
* ``GET /entitlements/{grant_id}``: the entitlement (revoked ones too), or 404.
* ``DELETE /entitlements/{grant_id}``: revokes (again: the same answer); 404 if never granted.

Control (no authentication): ``POST /_control/faults`` {kind, operation, count,
subscriber_ref, delay_seconds, status, reason}, ``GET /_control/books``. Fault kinds:
``unavailable`` (answer ``status``, 503 by default, without acting), ``slow`` (act and answer
after ``delay_seconds``), ``drop`` (act, then close the connection without answering),
``refuse`` (the subscriber's account is closed for good: 422 with ``reason``), ``clear``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import signal
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from simulators.core import drop_connection

DEFAULT_TOKEN = "dev-game-backend-token"
TOKEN_ENV = "CB_GAME_BACKEND_TOKEN"

Operation = Literal["grant", "revoke", "lookup"]
_FAULT_KINDS = {"unavailable", "slow", "drop"}
_OPERATIONS = {"grant", "revoke", "lookup"}


class BadRequest(ValueError):
    pass


@dataclass
class Entitlement:
    grant_id: str
    entitlement_id: str
    subscriber_ref: str
    sku: str
    quantity: int | None
    until: str | None
    granted_at: str
    status: str = "active"
    revoked_at: str | None = None

    def same_terms(self, other: Entitlement) -> bool:
        return (self.subscriber_ref, self.sku, self.quantity, self.until) == (
            other.subscriber_ref, other.sku, other.quantity, other.until)


@dataclass
class Fault:
    kind: str
    operation: str
    remaining: int
    subscriber_ref: str | None = None
    delay_seconds: float = 0.0
    status: int = 503


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _canonical_until(value: object) -> str:
    """One spelling per moment ("Z" and "+00:00" alike), so a replay is recognised."""
    if not isinstance(value, str):
        raise BadRequest("until must be an ISO 8601 string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"until {value!r} is not an ISO 8601 datetime") from None
    if moment.tzinfo is None:
        raise BadRequest("until must carry its UTC offset")
    return moment.astimezone(UTC).isoformat()


def _text(body: dict[str, Any], name: str, limit: int = 128) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise BadRequest(f"{name} must be a non-empty string of at most {limit} characters")
    return value


def _parse_grant(body: object) -> Entitlement:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    quantity, until = body.get("quantity"), body.get("until")
    if (quantity is None) == (until is None):
        raise BadRequest("give exactly one of quantity and until")
    if quantity is not None and (not isinstance(quantity, int) or isinstance(quantity, bool)
                                 or quantity <= 0):
        raise BadRequest("quantity must be a positive integer")
    return Entitlement(
        grant_id=_text(body, "grant_id"), entitlement_id=f"ent-{uuid.uuid4().hex[:20]}",
        subscriber_ref=_text(body, "subscriber_ref"), sku=_text(body, "sku"),
        quantity=quantity, until=None if until is None else _canonical_until(until),
        granted_at=_now())


def _error(status: int, error: str, message: str = "") -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status)


class GameBackend:
    """The backend's books and its HTTP handlers; state lives in memory for the process."""

    def __init__(self, token: str = DEFAULT_TOKEN) -> None:
        self._token = token.encode()
        self.entitlements: dict[str, Entitlement] = {}
        # grant requests received per grant id, answered or not
        self.grant_requests: Counter[str] = Counter()
        # closed accounts: subscriber_ref -> reason
        self.refused: dict[str, str] = {}
        self.faults: list[Fault] = []

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate])
        app.router.add_post("/entitlements", self.grant)
        app.router.add_get("/entitlements/{grant_id}", self.lookup)
        app.router.add_delete("/entitlements/{grant_id}", self.revoke)
        app.router.add_post("/_control/faults", self.add_fault)
        app.router.add_get("/_control/books", self.books)
        return app

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/_control/"):
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(given, self._token):
                return _error(401, "unauthorized", "a valid bearer token is required")
        return await handler(request)

    def _take_fault(self, operation: Operation, subscriber_ref: str | None) -> Fault | None:
        for fault in self.faults:
            if fault.operation == operation and fault.subscriber_ref in (None, subscriber_ref):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    async def _before(self, fault: Fault | None) -> web.Response | None:
        """The faults that strike before the backend acts."""
        if fault is None:
            return None
        if fault.kind == "unavailable":
            return _error(fault.status, "unavailable", "injected fault")
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay_seconds)
        return None

    @staticmethod
    def _after(request: web.Request, fault: Fault | None) -> None:
        """Acted, but the caller never hears of it."""
        if fault is not None and fault.kind == "drop":
            drop_connection(request)

    async def grant(self, request: web.Request) -> web.Response:
        try:
            wanted = _parse_grant(await request.json())
        except ValueError as exc:  # (json errors are ValueErrors too)
            return _error(400, "bad_request", str(exc))
        self.grant_requests[wanted.grant_id] += 1
        fault = self._take_fault("grant", wanted.subscriber_ref)
        if (refusal := await self._before(fault)) is not None:
            return refusal
        existing = self.entitlements.get(wanted.grant_id)
        if existing is not None:
            if not existing.same_terms(wanted):
                return _error(409, "grant_id_conflict",
                              "this grant id was used for other terms")
            self._after(request, fault)
            return web.json_response(asdict(existing), status=200)
        # a replay of an earlier grant is answered above even if the account closed since
        if (reason := self.refused.get(wanted.subscriber_ref)) is not None:
            return _error(422, reason, "the subscriber's account refuses entitlements")
        self.entitlements[wanted.grant_id] = wanted
        self._after(request, fault)
        return web.json_response(asdict(wanted), status=201)

    async def lookup(self, request: web.Request) -> web.Response:
        found = self.entitlements.get(request.match_info["grant_id"])
        fault = self._take_fault("lookup", found.subscriber_ref if found else None)
        if (refusal := await self._before(fault)) is not None:
            return refusal
        if found is None:
            return _error(404, "not_found", "never granted")
        return web.json_response(asdict(found))

    async def revoke(self, request: web.Request) -> web.Response:
        found = self.entitlements.get(request.match_info["grant_id"])
        fault = self._take_fault("revoke", found.subscriber_ref if found else None)
        if (refusal := await self._before(fault)) is not None:
            return refusal
        if found is None:
            return _error(404, "not_found", "never granted")
        if found.status != "revoked":
            found.status, found.revoked_at = "revoked", _now()
        self._after(request, fault)
        return web.json_response(asdict(found))

    async def add_fault(self, request: web.Request) -> web.Response:
        body = await request.json()
        kind = body.get("kind")
        if kind == "clear":
            self.faults.clear()
            self.refused.clear()
        elif kind == "refuse":
            self.refused[str(body["subscriber_ref"])] = str(body.get("reason", "account_closed"))
        elif kind in _FAULT_KINDS and body.get("operation", "grant") in _OPERATIONS:
            self.faults.append(Fault(
                kind=kind, operation=body.get("operation", "grant"),
                remaining=int(body.get("count", 1)), subscriber_ref=body.get("subscriber_ref"),
                delay_seconds=float(body.get("delay_seconds", 0)),
                status=int(body.get("status", 503))))
        else:
            return _error(400, "bad_request", f"unknown fault {kind!r} or operation")
        return web.json_response({"faults": len(self.faults), "refused": len(self.refused)})

    async def books(self, _request: web.Request) -> web.Response:
        return web.json_response({
            "entitlements": [asdict(e) for e in self.entitlements.values()],
            "grant_requests": dict(self.grant_requests),
            "refused": self.refused,
        })


async def start_game_backend(backend: GameBackend, host: str = "127.0.0.1", port: int = 0
                             ) -> tuple[web.AppRunner, int]:
    """Starts the server in the running loop; returns the runner and the port bound."""
    runner = web.AppRunner(backend.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])


async def _serve(backend: GameBackend, host: str, port: int) -> None:
    runner, bound = await start_game_backend(backend, host, port)
    print(f"game backend on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8703)
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV, DEFAULT_TOKEN),
                        help=f"the bearer token callers must present (default: ${TOKEN_ENV})")
    args = parser.parse_args()
    asyncio.run(_serve(GameBackend(args.token), args.host, args.port))


if __name__ == "__main__":
    main()
