"""What operators read (``starter.py reconcile --date``): each carrier's reconciliation of a
day, its counts, and every mismatch and decision."""

from __future__ import annotations

from datetime import date

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from models.reconciliation import ReconciliationItem, ReconciliationRun
from reconciliation.compare import MISMATCH_KINDS


def _amount(value: int | None) -> str:
    return "-" if value is None else str(value)


def latest_runs(engine: Engine, limit: int = 50) -> list[dict[str, object]]:
    """The latest reconciliation runs, one row per carrier and day, for the statistics page."""
    with Session(engine) as session:
        runs = session.exec(select(ReconciliationRun).order_by(
            col(ReconciliationRun.day).desc(), col(ReconciliationRun.carrier_id)).limit(limit))
        return [{"day": run.day.isoformat(), "carrier": run.carrier_id,
                 "final": run.final, "report rows": run.report_rows, "missing": run.missing,
                 "extra": run.extra, "amount differs": run.amount_differs,
                 "reconciled": run.reconciled, "not charged": run.not_charged,
                 "unresolved": run.unresolved} for run in runs]


def report_for(engine: Engine, day: date, carrier_id: str | None = None) -> str:
    """A printable summary of ``day``'s reconciliation (every carrier, or one). Amounts in
    minor units. Its last line is ``reconciliation mismatches: N``, N the mismatches no
    decision resolved (those found and resolved are counted on the line before)."""
    with Session(engine) as session:
        query = select(ReconciliationRun).where(ReconciliationRun.day == day)
        if carrier_id is not None:
            query = query.where(ReconciliationRun.carrier_id == carrier_id)
        runs = session.exec(query.order_by(col(ReconciliationRun.carrier_id))).all()
        lines = [f"reconciliation of {day.isoformat()}"
                 + (f" for {carrier_id}" if carrier_id else "")]
        if not runs:
            lines.append("  not reconciled yet")
        found = open_ = 0
        for run in runs:
            found += run.mismatches
            lines.append(
                f"  {run.carrier_id}: {'final' if run.final else 'preliminary'} report, "
                f"{run.report_rows} rows; missing {run.missing}, extra {run.extra}, "
                f"amount differs {run.amount_differs}; reconciled {run.reconciled}, "
                f"not charged {run.not_charged}; unresolved {run.unresolved}")
            items = session.exec(select(ReconciliationItem).where(
                ReconciliationItem.run_id == run.id).order_by(
                col(ReconciliationItem.kind), col(ReconciliationItem.match_key))).all()
            open_ += sum(1 for i in items if i.kind in MISMATCH_KINDS and i.resolution is None)
            for item in items:
                lines.append(
                    f"    {item.kind:<14} {item.match_key}  ledger "
                    f"{_amount(item.ledger_amount_minor)} / carrier "
                    f"{_amount(item.report_amount_minor)} {item.currency}  "
                    f"[{item.resolution or 'unresolved'}] {item.detail}")
        lines.append(f"mismatches found {found}, resolved by reconciliation {found - open_}")
        lines.append(f"reconciliation mismatches: {open_}")
        return "\n".join(lines)
