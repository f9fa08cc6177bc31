"""Durable record of premium SMS submissions: what stops a second submit_sm for one key, and
what matches a delivery receipt to its operation however late it comes."""

from __future__ import annotations

import asyncio

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from models.tables import SmppSubmission, utcnow


class SubmissionStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

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
            if row.state == "refused":  # never accepted by the SMSC: sending again is safe
                row.state, row.updated_at = "sending", utcnow()
                session.add(row)
                session.commit()
                session.refresh(row)
                return row, True
            return row, False

    async def reserve(self, carrier_id: str, key: str, msisdn: str) -> tuple[SmppSubmission, bool]:
        """The submission for ``key``, and whether the caller may send it now."""
        return await asyncio.to_thread(self._reserve, carrier_id, key, msisdn)

    @staticmethod
    def _find(session: Session, carrier_id: str, key: str) -> SmppSubmission | None:
        return session.exec(select(SmppSubmission).where(
            SmppSubmission.carrier_id == carrier_id, SmppSubmission.idempotency_key == key)).first()

    def _get(self, carrier_id: str, key: str) -> SmppSubmission | None:
        with Session(self._engine) as session:
            return self._find(session, carrier_id, key)

    async def get(self, carrier_id: str, key: str) -> SmppSubmission | None:
        return await asyncio.to_thread(self._get, carrier_id, key)

    def _update(self, row_id: int, **changes: str | None) -> SmppSubmission:
        with Session(self._engine) as session:
            row = session.get(SmppSubmission, row_id)
            assert row is not None
            if row.state in ("delivered", "failed") and changes.get("state") == "submitted":
                changes.pop("state")  # the receipt overtook the submit_sm_resp
            for name, value in changes.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
            session.add(row)
            session.commit()
            session.refresh(row)
            return row

    async def update(self, row_id: int, **changes: str | None) -> SmppSubmission:
        return await asyncio.to_thread(self._update, row_id, **changes)

    def _match_receipt(self, carrier_id: str, message_id: str | None, user_reference: int | None,
                       msisdn: str) -> SmppSubmission | None:
        with Session(self._engine) as session:
            if message_id:
                # SMSCs reuse message ids: a submission still waiting wins, then the newest
                rows = session.exec(select(SmppSubmission).where(
                    SmppSubmission.carrier_id == carrier_id,
                    SmppSubmission.message_id == message_id)).all()
                if rows:
                    return max(rows, key=lambda r: (r.state in ("sending", "submitted"), r.id or 0))
            if user_reference is None:
                return None
            # the submit_sm_resp was lost: match the reference we sent, for this number
            candidates = session.exec(select(SmppSubmission).where(
                SmppSubmission.carrier_id == carrier_id, SmppSubmission.msisdn == msisdn,
                SmppSubmission.state.in_(("sending", "submitted")))).all()  # type: ignore[attr-defined]
            matching = [r for r in candidates if r.user_reference == user_reference]
            return matching[0] if len(matching) == 1 else None

    async def match_receipt(self, carrier_id: str, message_id: str | None,
                            user_reference: int | None, msisdn: str) -> SmppSubmission | None:
        return await asyncio.to_thread(self._match_receipt, carrier_id, message_id,
                                       user_reference, msisdn)
