"""Stores every carrier exchange (already redacted by the transport) as a CarrierInteraction."""

from __future__ import annotations

import asyncio

from sqlalchemy.engine import Engine
from sqlmodel import Session

from carriers.http import InteractionRecord
from models.tables import CarrierInteraction


class InteractionStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _write(self, record: InteractionRecord) -> None:
        with Session(self._engine) as session:
            session.add(CarrierInteraction(**record.model_dump()))
            session.commit()

    async def record(self, record: InteractionRecord) -> None:
        await asyncio.to_thread(self._write, record)
