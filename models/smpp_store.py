"""Durable record of premium SMS submissions: what stops a second submit_sm for one key, and
what matches a delivery receipt to its operation however late it comes.

A row only ever moves forward, and each move is one conditional ``UPDATE`` (``... WHERE
state IN (the states it may come from)``), never a read followed by a write, so two writers
racing (a receipt and a late submit_sm_resp, two workers) cannot undo each other:

    sending -> submitted (the SMSC's message id is known) -> delivered | failed
    sending -> delivered | failed (a receipt matched by user_message_reference)
    sending -> refused (the SMSC answered that it did not take it) -> sending (sent again)
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from models.db import in_db_thread
from models.tables import SmppSubmission, utcnow

# where a receipt (or a query_sm answer) may take a row: never out of a final state
OPEN_STATES = ("sending", "submitted")
FINAL_STATES = ("delivered", "failed")

_table = SmppSubmission.__table__  # type: ignore[attr-defined]


class SubmissionStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- reading ----------------------------------------------------------------------------------

    @staticmethod
    def _find(session: Session, carrier_id: str, key: str) -> SmppSubmission | None:
        return session.exec(select(SmppSubmission).where(
            SmppSubmission.carrier_id == carrier_id, SmppSubmission.idempotency_key == key)).first()

    def _get(self, carrier_id: str, key: str) -> SmppSubmission | None:
        with Session(self._engine) as session:
            return self._find(session, carrier_id, key)

    async def get(self, carrier_id: str, key: str) -> SmppSubmission | None:
        return await in_db_thread(self._engine, self._get, carrier_id, key)

    def _by_id(self, row_id: int) -> SmppSubmission:
        with Session(self._engine) as session:
            row = session.get(SmppSubmission, row_id)
            assert row is not None
            return row

    # -- moves ------------------------------------------------------------------------------------

    def _move(self, where: sa.ColumnElement[bool], **values: Any) -> int:
        """One conditional UPDATE; the number of rows it changed."""
        with self._engine.begin() as connection:
            result = connection.execute(
                sa.update(_table).where(where).values(**values, updated_at=utcnow()))
            return int(result.rowcount)

    def _reserve(self, carrier_id: str, key: str, msisdn: str) -> tuple[SmppSubmission, bool]:
        with Session(self._engine) as session:
            row = self._find(session, carrier_id, key)
            if row is None:
                row = SmppSubmission(carrier_id=carrier_id, idempotency_key=key, msisdn=msisdn,
                                     state="sending")
                session.add(row)
                try:
                    session.commit()
                except IntegrityError:  # another attempt reserved it first
                    session.rollback()
                    existing = self._find(session, carrier_id, key)
                    assert existing is not None
                    return existing, False
                session.refresh(row)
                return row, True
        assert row.id is not None
        if row.state == "refused":  # never accepted by the SMSC: sending again is safe
            taken = self._move((_table.c.id == row.id) & (_table.c.state == "refused"),
                               state="sending")
            # whoever moved it out of "refused" first sends; the others see it as it is now
            return self._by_id(row.id), taken == 1
        return row, False

    async def reserve(self, carrier_id: str, key: str, msisdn: str) -> tuple[SmppSubmission, bool]:
        """The submission for ``key``, and whether the caller may send it now."""
        return await in_db_thread(self._engine, self._reserve, carrier_id, key, msisdn)

    def _submitted(self, carrier_id: str, key: str, message_id: str) -> SmppSubmission | None:
        match = (_table.c.carrier_id == carrier_id) & (_table.c.idempotency_key == key)
        # the message id is kept whatever the state (a receipt may have overtaken the answer);
        # the state moves only out of "sending"
        self._move(match & (_table.c.state == "sending"), state="submitted", message_id=message_id)
        self._move(match & _table.c.message_id.is_(None), message_id=message_id)
        return self._get(carrier_id, key)

    async def submitted(self, carrier_id: str, key: str, message_id: str
                        ) -> SmppSubmission | None:
        """The SMSC accepted the submission and named it ``message_id`` (submit_sm_resp)."""
        return await in_db_thread(self._engine, self._submitted, carrier_id, key, message_id)

    def _refused(self, row_id: int) -> SmppSubmission:
        self._move((_table.c.id == row_id) & (_table.c.state == "sending"), state="refused")
        return self._by_id(row_id)

    async def refused(self, row_id: int) -> SmppSubmission:
        """The SMSC answered that it did not take the submission: it may be sent again."""
        return await in_db_thread(self._engine, self._refused, row_id)

    def _settled(self, row_id: int, delivered: bool, message_id: str | None,
                 receipt_status: str, error_code: str) -> SmppSubmission:
        self._move((_table.c.id == row_id) & _table.c.state.in_(OPEN_STATES),
                   state="delivered" if delivered else "failed",
                   message_id=sa.func.coalesce(_table.c.message_id, message_id),
                   receipt_status=receipt_status, error_code=error_code)
        return self._by_id(row_id)

    async def settled(self, row_id: int, delivered: bool, message_id: str | None,
                      receipt_status: str, error_code: str) -> SmppSubmission:
        """The final state from a receipt or a query_sm answer. The first final state stays:
        a repeated or later answer changes nothing. Returns the row as it now is."""
        return await in_db_thread(self._engine, self._settled, row_id, delivered, message_id,
                                  receipt_status, error_code)

    # -- receipts ---------------------------------------------------------------------------------

    def _match_receipt(self, carrier_id: str, message_id: str | None, user_reference: int | None,
                       msisdn: str) -> SmppSubmission | None:
        with Session(self._engine) as session:
            if message_id:
                # SMSCs reuse message ids, even for one subscriber: only this number's
                # submissions can be meant, and among several only the one our reference
                # names; a receipt that could belong to another (perhaps final) submission
                # settles none
                rows = list(session.exec(select(SmppSubmission).where(
                    SmppSubmission.carrier_id == carrier_id,
                    SmppSubmission.message_id == message_id,
                    SmppSubmission.msisdn == msisdn)).all())
                if user_reference is not None:  # the reference we sent names the submission
                    rows = [r for r in rows if r.user_reference == user_reference]
                if len(rows) == 1:
                    return rows[0]
                if rows:  # the id was reused and nothing tells which: query_sm decides
                    return None
            if user_reference is None:
                return None
            # the submit_sm_resp was lost: match the reference we sent, for this number
            candidates = session.exec(select(SmppSubmission).where(
                SmppSubmission.carrier_id == carrier_id, SmppSubmission.msisdn == msisdn,
                SmppSubmission.state.in_(OPEN_STATES))).all()  # type: ignore[attr-defined]
            matching = [r for r in candidates if r.user_reference == user_reference]
            return matching[0] if len(matching) == 1 else None

    async def match_receipt(self, carrier_id: str, message_id: str | None,
                            user_reference: int | None, msisdn: str) -> SmppSubmission | None:
        return await in_db_thread(self._engine, self._match_receipt, carrier_id, message_id,
                                  user_reference, msisdn)
