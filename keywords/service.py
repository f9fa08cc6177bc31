"""Wires mobile-originated SMS in the worker: the SMPP adapters hand each text to
``MoService.accept``, which stores it (before the SMSC gets its acknowledgement) and queues it
for the handler; one consumer acts on texts in arrival order, so a JOIN followed by a STOP is
never acted on the other way round.

    mo = await attach_mobile_originated(client, engine, registry, adapters, settings)
    ...
    await mo.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from temporalio.client import Client
from temporalio.service import RPCError

from activities.notices import NoticeSender
from carriers.loader import Registry
from carriers.pool import AdapterPool
from carriers.smpp import MobileOriginated, SmppAdapter
from keywords.handler import MoHandler
from keywords.routes import KeywordRoutes
from models.db import in_db_thread
from models.inbound_sms import (
    INBOUND_OPEN,
    InboundSms,
    dedup_key,
    finish_inbound,
    open_inbound,
    store_inbound,
)
from models.tables import utcnow
from settings import Settings
from starter import SubscriptionClient

log = logging.getLogger(__name__)

# a text whose handling failed (Temporal or the SMSC out of reach) is tried again after this
RETRY_SECONDS = 5.0
# a text that fails this often for a reason of our own (not an unreachable service) is set
# aside as "failed" for an operator, rather than holding every text behind it
MAX_FAILURES = 5
# failures that only mean a service is out of reach: tried again for as long as it takes
_UNREACHABLE = (RPCError, OSError, OperationalError, ConnectionError)


class MoService:
    def __init__(self, handler: MoHandler, engine: Engine,
                 retry_seconds: float = RETRY_SECONDS) -> None:
        self._handler = handler
        self._engine = engine
        self._retry = retry_seconds
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._queued: set[int] = set()
        self._consumer: asyncio.Task[None] | None = None

    # -- the adapters' sink ------------------------------------------------------------------

    async def accept(self, mo: MobileOriginated) -> None:
        """Stores the text (raising if it cannot: the SMSC will deliver it again) and queues
        it unless a redelivery finds it acted on already."""
        row = await in_db_thread(self._engine, self._store, mo)
        assert row.id is not None
        if row.state == INBOUND_OPEN:
            self._enqueue(row.id)

    def _store(self, mo: MobileOriginated) -> InboundSms:
        now = utcnow()
        with Session(self._engine, expire_on_commit=False) as session:
            return store_inbound(session, InboundSms(
                carrier_id=mo.carrier_id, smsc_message_id=mo.message_id,
                dedup_key=dedup_key(mo.message_id, mo.msisdn, mo.short_code, mo.text, now),
                msisdn=mo.msisdn, short_code=mo.short_code, text=mo.text, received_at=now))

    # -- acting ------------------------------------------------------------------------------

    def _enqueue(self, row_id: int) -> None:
        if row_id in self._queued:  # queued or in hand: a redelivery adds nothing
            return
        self._queued.add(row_id)
        self._queue.put_nowait(row_id)
        if self._consumer is None:
            self._consumer = asyncio.create_task(self._consume(), name="mo-consumer")

    async def resume(self) -> int:
        """Queues the texts stored but never acted on (a worker stopped in between)."""
        rows = await in_db_thread(self._engine, self._open)
        for row_id in rows:
            self._enqueue(row_id)
        return len(rows)

    def _open(self) -> list[int]:
        with Session(self._engine) as session:
            return [r.id for r in open_inbound(session) if r.id is not None]

    def _load(self, row_id: int) -> InboundSms | None:
        with Session(self._engine, expire_on_commit=False) as session:
            return session.get(InboundSms, row_id)

    async def _consume(self) -> None:
        while True:
            row_id = await self._queue.get()
            try:
                await self._act(row_id)
            finally:
                self._queued.discard(row_id)
                self._queue.task_done()

    async def _act(self, row_id: int) -> None:
        """Acts on one text, trying again until it is done: the texts behind it wait, so a
        STOP is never acted on before the JOIN sent ahead of it."""
        failures = 0
        while True:
            try:
                row = await in_db_thread(self._engine, self._load, row_id)
                if row is not None and row.state == INBOUND_OPEN:
                    await self._handler.handle(row)
                return
            except Exception as exc:  # kept open in the database meanwhile
                if not isinstance(exc, _UNREACHABLE):
                    failures += 1
                if failures >= MAX_FAILURES:
                    log.error("mo %s set aside after %d failures: %s", row_id, failures,
                              type(exc).__name__)
                    with contextlib.suppress(Exception):
                        await in_db_thread(self._engine, self._set_aside, row_id, repr(exc)[:200])
                    return
                log.warning("mo %s not acted on: %s; tried again in %.0fs", row_id,
                            type(exc).__name__, self._retry)
                await asyncio.sleep(self._retry)

    def _set_aside(self, row_id: int, error: str) -> None:
        with Session(self._engine) as session:
            finish_inbound(session, row_id, "failed", "", error)

    async def drain(self) -> None:
        """Waits until every queued text has been acted on."""
        await self._queue.join()

    async def aclose(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
            self._consumer = None


def build_mo_service(client: Client, engine: Engine, registry: Registry, adapters: AdapterPool,
                     settings: Settings, routes: KeywordRoutes | None = None,
                     welcome_on_subscribe: bool = False) -> MoService:
    """The handler (starting and cancelling subscriptions through ``client``, answering
    through the carriers' SMSCs) and the service the SMPP adapters hand texts to."""
    subscriptions = SubscriptionClient(client, engine, registry, settings.task_queue,
                                       settings.deployment_id)
    handler = MoHandler(subscriptions, NoticeSender(engine, adapters, registry), engine,
                        registry, routes, welcome_on_subscribe)
    return MoService(handler, engine)


async def attach_mobile_originated(client: Client, engine: Engine, registry: Registry,
                                   adapters: AdapterPool, settings: Settings,
                                   routes: KeywordRoutes | None = None,
                                   welcome_on_subscribe: bool = False) -> MoService:
    """Builds the service, makes it every SMPP adapter's sink for texts, and queues the texts
    a previous run stored but did not act on. Call before ``adapters.start_sessions()``."""
    service = build_mo_service(client, engine, registry, adapters, settings, routes,
                               welcome_on_subscribe)
    for carrier in registry.carriers.values():
        if carrier.protocol == "smpp":
            adapter = adapters.get(carrier.id)
            if isinstance(adapter, SmppAdapter):
                adapter.set_mobile_originated_sink(service.accept)
    await service.resume()
    return service
