"""Stores every carrier exchange (already redacted by the transport) as a CarrierInteraction,
with its traceability document in the same transaction (``traceability.outbox``).

A money operation may hold its exchanges (``held``) to write them in the transaction that
concludes it: one commit fewer on the charge path. Whatever is still held when the operation
ends without concluding is written on its own, so no exchange goes unrecorded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from carriers.http import InteractionRecord
from models.db import in_db_lane, in_db_thread, insert_row
from models.tables import CarrierInteraction
from traceability.documents import interaction_document
from traceability.outbox import enqueue


@dataclass
class _Holding:
    """Exchanges held by one task while it is open. A task started meanwhile (an SMPP
    session's reader, say) inherits the context variable but is not the holder: its
    exchanges, and any recorded after the holding closed, are written at once."""

    task: asyncio.Task[Any] | None
    records: list[InteractionRecord] = field(default_factory=list)
    open: bool = True

    def takes(self) -> bool:
        return self.open and self.task is asyncio.current_task()


_HELD: ContextVar[_Holding | None] = ContextVar("held_interactions", default=None)


def add_interactions(session: Session, records: Sequence[InteractionRecord]) -> None:
    """Adds the exchanges and their documents to the session's transaction; the caller
    commits."""
    for record in records:
        row = CarrierInteraction(**record.model_dump())
        insert_row(session, row)  # the row's id names its document
        enqueue(session, interaction_document(session, row))


def _write(engine: Engine, records: Sequence[InteractionRecord]) -> None:
    with Session(engine) as session:
        add_interactions(session, records)
        session.commit()


@asynccontextmanager
async def held(engine: Engine) -> AsyncIterator[list[InteractionRecord]]:
    """Holds the exchanges this task records meanwhile in the list it yields; the holder
    writes and empties it with its own transaction. What is left at the end is written here."""
    holding = _Holding(asyncio.current_task())
    records = holding.records
    token = _HELD.set(holding)
    try:
        yield records
    finally:
        holding.open = False
        _HELD.reset(token)
        if records:
            await in_db_thread(engine, _write, engine, list(records))
            records.clear()


class InteractionStore:
    def __init__(self, engine: Engine, lane: str = "main") -> None:
        self._engine = engine
        self._lane = lane

    async def record(self, record: InteractionRecord) -> None:
        holding = _HELD.get()
        if holding is not None and holding.takes():
            holding.records.append(record)
            return
        await in_db_lane(self._engine, self._lane, partial(_write, self._engine, [record]))
