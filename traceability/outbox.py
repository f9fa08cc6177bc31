"""Writing to and reading from the outbox. ``enqueue`` only adds to the caller's session: the
document commits (or rolls back) with the row it describes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from models.outbox import OutboxEntry
from models.tables import utcnow
from traceability.documents import TraceDocument

# refusals of one document (mapping conflicts, not outages) before it is set aside
MAX_ATTEMPTS = 5


def enqueue(session: Session, document: TraceDocument) -> None:
    """Writes the document in the session's transaction; the caller commits."""
    session.execute(_INSERT, {
        "doc_id": document.doc_id, "index_name": document.index_name,
        "document": json.dumps(document.body, separators=(",", ":"), ensure_ascii=False,
                               sort_keys=True),
        "created_at": utcnow(), "indexed_at": None, "attempts": 0, "last_error": None})


# (a Core INSERT: one per carrier exchange and ledger entry, where the ORM's unit of work
# cost more than the insert)
_INSERT = OutboxEntry.__table__.insert()  # type: ignore[attr-defined]


def pending(engine: Engine, limit: int) -> list[OutboxEntry]:
    """The oldest rows not yet indexed and not set aside."""
    with Session(engine, expire_on_commit=False) as session:
        return list(session.exec(
            select(OutboxEntry)
            .where(col(OutboxEntry.indexed_at).is_(None), OutboxEntry.attempts < MAX_ATTEMPTS)
            .order_by(col(OutboxEntry.id)).limit(limit)).all())


def mark_indexed(engine: Engine, ids: Sequence[int], at: datetime | None = None) -> None:
    if not ids:
        return
    with Session(engine) as session:
        session.execute(sa.update(OutboxEntry).where(col(OutboxEntry.id).in_(ids))
                        .values(indexed_at=at or utcnow()))
        session.commit()


def mark_refused(engine: Engine, refusals: dict[int, str]) -> None:
    with Session(engine) as session:
        for row_id, error in refusals.items():
            session.execute(sa.update(OutboxEntry).where(col(OutboxEntry.id) == row_id).values(
                attempts=OutboxEntry.attempts + 1, last_error=error[:1000]))
        session.commit()


def backlog(engine: Engine) -> int:
    """Rows still to be indexed (set-aside rows included: they are not indexed either)."""
    with Session(engine) as session:
        return int(session.exec(select(sa.func.count()).select_from(OutboxEntry).where(
            col(OutboxEntry.indexed_at).is_(None))).one())


def document_count(engine: Engine) -> int:
    """Distinct documents the outbox holds: a document enqueued twice (a row written, then
    settled) is one document in OpenSearch."""
    with Session(engine) as session:
        return int(session.exec(select(sa.func.count(sa.distinct(col(OutboxEntry.doc_id))))).one())
