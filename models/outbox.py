"""The traceability outbox: documents for OpenSearch, written in the same transaction as the row
they describe and drained in bulk by ``traceability.indexer``. OpenSearch being down delays
them; it never loses them."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.tables import utcnow


class OutboxEntry(SQLModel, table=True):
    __tablename__ = "trace_outbox"
    __table_args__ = (
        # the drainer's scan: pending rows in order
        sa.Index("ix_trace_outbox_pending", "indexed_at", "id"),
    )

    # also the document's external version: a later row for the same document wins, and a
    # re-delivered or stale one is refused by OpenSearch instead of overwriting
    id: int | None = Field(default=None, primary_key=True)
    # "<source>-<row id>": the OpenSearch _id, so delivering a row twice writes one document
    doc_id: str = Field(max_length=160, index=True)
    index_name: str = Field(max_length=64)
    # the document's JSON source (already hashed, masked and redacted)
    document: str
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
    indexed_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    # refusals by OpenSearch of this document (not outages): after a few it is set aside
    attempts: int = 0
    last_error: str | None = None
