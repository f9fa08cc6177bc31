"""Stores every carrier exchange (already redacted by the transport) as a CarrierInteraction,
with its traceability document in the same transaction (``traceability.outbox``)."""

from __future__ import annotations

import asyncio

from sqlalchemy.engine import Engine
from sqlmodel import Session

from carriers.http import InteractionRecord
from models.tables import CarrierInteraction
from traceability.documents import interaction_document
from traceability.outbox import enqueue


class InteractionStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _write(self, record: InteractionRecord) -> None:
        with Session(self._engine) as session:
            row = CarrierInteraction(**record.model_dump())
            session.add(row)
            session.flush()  # the row's id names its document
            enqueue(session, interaction_document(session, row))
            session.commit()

    async def record(self, record: InteractionRecord) -> None:
        await asyncio.to_thread(self._write, record)
