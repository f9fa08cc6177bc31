"""What reconciliation found: one run per carrier and day (its counts), and its items (every
mismatch, and the decision taken for each unsettled charge of that day)."""

from __future__ import annotations

from datetime import date, datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.tables import utcnow


class ReconciliationRun(SQLModel, table=True):
    __table_args__ = (sa.UniqueConstraint("carrier_id", "day"),)

    id: int | None = Field(default=None, primary_key=True)
    carrier_id: str = Field(index=True, max_length=64)
    day: date = Field(sa_type=sa.Date, index=True)
    # the carrier's report was final (the day is over) rather than preliminary
    final: bool = False
    report_rows: int = 0
    missing: int = 0
    extra: int = 0
    amount_differs: int = 0
    # decisions taken (by any run of this carrier and day)
    reconciled: int = 0
    not_charged: int = 0
    # items nobody has resolved: for an operator
    unresolved: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))

    @property
    def mismatches(self) -> int:
        return self.missing + self.extra + self.amount_differs


class ReconciliationItem(SQLModel, table=True):
    """A mismatch (missing, extra, amount_differs) or an unsettled charge of the day, with the
    decision taken (resolution: reconciled, not_charged) or none (still for an operator)."""

    __table_args__ = (sa.UniqueConstraint("run_id", "kind", "match_key"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="reconciliationrun.id", index=True)
    kind: str = Field(max_length=16)
    # our key, else "ref:<the carrier's reference>"
    match_key: str = Field(max_length=200)
    idempotency_key: str | None = Field(default=None, max_length=128, index=True)
    carrier_reference: str | None = None
    ledger_amount_minor: int | None = None
    report_amount_minor: int | None = None
    currency: str = Field(max_length=3)
    resolution: str | None = Field(default=None, max_length=16)
    detail: str = ""
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
