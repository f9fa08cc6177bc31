"""The callback receiver: carriers POST results to /callbacks/{carrier_id}; each is verified,
recorded (redacted) and relayed as a ``carrier_result`` signal to the workflow waiting for it.

Duplicate and late callbacks are harmless: the workflow keeps only the result it waits for,
and a callback for a workflow that has finished is acknowledged and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import replace

from aiohttp import web
from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.service import RPCError

import codec
from activities.messages import CarrierReport
from carriers.callback_aggregator import parse_callback as parse_aggregator_callback
from carriers.camara import parse_event as parse_camara_event
from carriers.http import InteractionRecord, InteractionSink
from carriers.loader import Registry, default_registry
from carriers.redaction import redact
from carriers.reports import CallbackRejected
from models.db import make_engine
from models.interactions import InteractionStore
from report_relay import ReportRelay
from settings import Settings, get_settings

CallbackParser = Callable[[bytes, dict[str, str], str, str | None], CarrierReport]
CALLBACK_PARSERS: dict[str, CallbackParser] = {
    "callback-aggregator": parse_aggregator_callback,
    "camara": parse_camara_event,
}

log = logging.getLogger("callback_receiver")


class CallbackReceiver:
    def __init__(self, client: Client, registry: Registry, settings: Settings,
                 sink: InteractionSink, engine: Engine) -> None:
        self._registry = registry
        self._settings = settings
        self._sink = sink
        self._relay = ReportRelay(client, engine, sink, settings.task_queue, lane="callbacks")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/callbacks/{carrier_id}", self.receive)
        # carriers whose events do not name our key get a sink URL that does
        app.router.add_post("/callbacks/{carrier_id}/{key}", self.receive)
        return app

    @staticmethod
    def _record(carrier_id: str, key: str, request: web.Request, body: bytes, status: int,
                outcome: str, started: float, error: str | None = None) -> InteractionRecord:
        return InteractionRecord(
            carrier_id=carrier_id, operation="callback", idempotency_key=key, method="POST",
            url=redact(str(request.rel_url)), request_body=redact(body.decode("utf-8", "replace")),
            status_code=status, response_body="", outcome=outcome, error=error,
            latency_ms=int((time.perf_counter() - started) * 1000))

    async def receive(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        carrier_id = request.match_info["carrier_id"]
        carrier = self._registry.carriers.get(carrier_id)
        parser = CALLBACK_PARSERS.get(carrier.protocol) if carrier else None
        if carrier is None or parser is None or not carrier.auth.callback_secret_ref:
            raise web.HTTPNotFound(text="no callbacks for this carrier")
        secret = self._settings.carrier_secrets.get(carrier.auth.callback_secret_ref)
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            if secret is None:
                raise CallbackRejected("no callback secret configured")
            report = parser(body, headers, secret.get_secret_value(),
                            request.match_info.get("key"))
            # authenticated with this carrier's own credential: it speaks for this carrier only
            report = replace(report, carrier_id=carrier_id)
        except CallbackRejected as exc:
            await self._sink(self._record(carrier_id, "", request, body, 401, "rejected",
                                          started, str(exc)))
            raise web.HTTPUnauthorized(text=str(exc)) from None
        try:
            delivered = await self._relay.relay(report, self._record(
                carrier_id, report.idempotency_key, request, body, 200, report.outcome, started))
        except RPCError as exc:  # carriers retry what is not acknowledged
            log.warning("callback for %s kept for the carrier's retry: %s",
                        report.idempotency_key, exc.message)
            raise web.HTTPServiceUnavailable(text="try again later") from None
        if delivered == "unroutable":
            raise web.HTTPBadRequest(text="unknown order")
        if delivered == "refused":
            raise web.HTTPForbidden(text="not this carrier's operation")
        return web.json_response({"status": delivered})


async def run_receiver(settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace,
                                  data_converter=codec.data_converter(settings))
    receiver = CallbackReceiver(client, default_registry(), settings,
                                InteractionStore(engine, lane="callbacks").record, engine)
    runner = web.AppRunner(receiver.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, settings.callback_host, settings.callback_port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("receiving callbacks on port %s", settings.callback_port)
    await stop.wait()
    await runner.cleanup()
    engine.dispose()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(run_receiver(get_settings()))


if __name__ == "__main__":
    main()
