"""HTTP transport shared by the REST and SOAP adapters: auth, timeouts, interaction records."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel

from carriers.auth import TokenError
from carriers.base import CarrierAdapter, LookupResult, OperationResult, Outcome
from carriers.redaction import redact


class InteractionRecord(BaseModel):
    carrier_id: str
    operation: str
    idempotency_key: str
    method: str
    url: str
    request_body: str
    status_code: int | None
    response_body: str
    outcome: str
    error: str | None
    latency_ms: int


InteractionSink = Callable[[InteractionRecord], Awaitable[None]]


async def discard_interaction(_record: InteractionRecord) -> None:
    return None


@dataclass(frozen=True)
class HttpReply:
    status_code: int
    text: str
    headers: httpx.Headers


def retry_after(reply: HttpReply) -> float | None:
    value = reply.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: let the activity's backoff decide


def refusal(reply: HttpReply) -> OperationResult | None:
    """What a status code alone says, alike for every HTTP carrier: busy (429/503) or not
    authorised (401/403). Neither did anything, and neither is the subscriber's doing: a
    rotated or expired credential is fixed by an operator, then the same request goes through,
    so both are transient (activities make credential refusals loud)."""
    if reply.status_code in (429, 503):
        return OperationResult(outcome=Outcome.TRANSIENT, carrier_code=str(reply.status_code),
                               message="carrier busy", retry_after_seconds=retry_after(reply))
    if reply.status_code in (401, 403):
        return OperationResult(outcome=Outcome.TRANSIENT, carrier_code=str(reply.status_code),
                               message="credentials refused")
    return None


ReplyMapper = Callable[[HttpReply], OperationResult]
LookupMapper = Callable[[HttpReply], LookupResult]


class HttpTransport:
    """Sends one request, maps the reply with a carrier-specific mapper and records the exchange.

    Network failures are classified here, the same for every carrier: a request that never
    reached the carrier is TRANSIENT, one that may have reached it is UNKNOWN.
    """

    def __init__(
        self,
        *,
        carrier_id: str,
        base_url: str,
        auth: httpx.Auth | None,
        timeout_seconds: float,
        secrets: list[str],
        sink: InteractionSink,
    ) -> None:
        self.carrier_id = carrier_id
        self._secrets = secrets
        self._sink = sink
        self._client = httpx.AsyncClient(
            base_url=base_url,
            auth=auth,
            timeout=httpx.Timeout(timeout_seconds),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )

    async def send(self, *, mapper: ReplyMapper, **request: Any) -> OperationResult:
        return await self._exchange(mapper=mapper, **request)

    async def lookup(self, *, mapper: LookupMapper, **request: Any) -> LookupResult:
        """A status look-up. Whatever stops the look-up itself (network, credentials, an
        unreadable reply) is FAILED: it tells nothing about the operation looked up."""
        outcome: LookupResult | None = None

        def read(reply: HttpReply) -> OperationResult:
            nonlocal outcome
            outcome = mapper(reply)
            if outcome.lookup.value == "found" and outcome.found is not None:
                return outcome.found
            return OperationResult(outcome=Outcome.UNKNOWN, carrier_code=outcome.carrier_code,
                                   message=f"look-up {outcome.lookup.value}: {outcome.message}")

        transport_result = await self._exchange(mapper=read, **request)
        if outcome is None:  # never mapped: not sent, no answer, or credentials refused
            return LookupResult.failure_of(transport_result)
        if outcome.found is not None:
            # carrier text is redacted on the way out, like every result
            return outcome.model_copy(update={"found": transport_result.model_copy(
                update={"outcome": outcome.found.outcome})})
        return outcome.model_copy(update={"message": transport_result.message})

    async def _exchange(
        self,
        *,
        operation: str,
        idempotency_key: str,
        method: str,
        path: str,
        mapper: ReplyMapper,
        json: object | None = None,
        data: dict[str, str] | None = None,
        content: str | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> OperationResult:
        request = self._client.build_request(
            method, path, json=json, data=data, content=content, params=params, headers=headers
        )
        started = time.perf_counter()
        reply: HttpReply | None = None
        error: str | None = None
        result: OperationResult

        async def record(outcome: Outcome, error: str | None) -> None:
            await self._sink(InteractionRecord(
                carrier_id=self.carrier_id, operation=operation,
                idempotency_key=idempotency_key, method=method,
                url=redact(str(request.url), self._secrets),
                request_body=redact(request.content.decode("utf-8", "replace"), self._secrets),
                status_code=reply.status_code if reply else None,
                response_body=redact(reply.text, self._secrets) if reply else "",
                outcome=outcome.value, error=redact(error, self._secrets) if error else None,
                latency_ms=int((time.perf_counter() - started) * 1000)))

        try:
            response = await self._client.send(request)
            reply = HttpReply(response.status_code, response.text, response.headers)
            result = mapper(reply)
        except TokenError as exc:
            error = f"TokenError: {exc}"
            # a token refused or not issued: nothing was sent to the payment API
            code = "AUTH" if exc.permanent else None
            result = OperationResult(outcome=Outcome.TRANSIENT, carrier_code=code,
                                     message=str(exc))
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            error = f"{type(exc).__name__}: {exc}"
            result = OperationResult(outcome=Outcome.TRANSIENT, message=f"not sent: {error}")
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
            result = OperationResult(
                outcome=Outcome.UNKNOWN, message=f"no answer after sending: {error}"
            )
        except asyncio.CancelledError:
            # the call was stopped (a timeout, a cancel, a worker stopping) after the request
            # may have left: what was sent is recorded all the same
            await record(Outcome.UNKNOWN, "cancelled while waiting for the answer")
            raise
        if result.message:  # carrier text reaches workflow histories
            result = result.model_copy(update={"message": redact(result.message, self._secrets)})
        await record(result.outcome, error)
        return result

    async def aclose(self) -> None:
        await self._client.aclose()


class HttpAdapter(CarrierAdapter):
    """Base of the adapters that talk HTTP through one HttpTransport."""

    def __init__(self, transport: HttpTransport) -> None:
        self.carrier_id = transport.carrier_id
        self._transport = transport

    async def aclose(self) -> None:
        await self._transport.aclose()
