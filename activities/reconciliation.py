"""Reconciliation activity: fetches one carrier's settlement report for one day over HTTP,
compares it with the ledger and the operations (``reconciliation.compare``), writes the
decisions for the charges left unsettled, and stores what it found
(``models.reconciliation``).

Every write is conditional, so a run repeated (a retried activity, a second schedule run, an
operator's ``reconcile``) writes nothing new, and a late settlement racing with it wins once:

* a reconciled charge is one transaction: the operation moves UNSETTLED -> SETTLED
  (outcome ``succeeded``, code ``RECONCILED``) and the ledger gets an entry of kind
  ``reconciled`` under the operation's own idempotency key. The ledger's unique key means a
  late result for that key can never add a second row (it finds the key taken);
* a charge closed as not charged moves UNSETTLED -> SETTLED with outcome ``rejected`` and code
  ``NOT_CHARGED`` (a final outcome: the operation record never changes again, and anyone
  settling the key later reads "rejected", never a debit), only while no ledger row exists
  for its key.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from carriers.loader import Registry
from models import ledger
from models import operations as ops
from models.db import in_db_thread
from models.reconciliation import ReconciliationItem, ReconciliationRun
from models.tables import (
    CarrierOperation,
    LedgerEntry,
    LedgerKind,
    OperationState,
    SmppSubmission,
    Subscriber,
    Subscription,
    utcnow,
)
from reconciliation.compare import (
    Item,
    ItemKind,
    LedgerSide,
    OperationSide,
    Ours,
    Reconcile,
    Resolution,
    compare,
)
from reconciliation.formats import ReportFormatError, ReportRow, parse, report_source

STATUS_HEADER = "X-Report-Status"
RECONCILED_CODE = "RECONCILED"
NOT_CHARGED_CODE = "NOT_CHARGED"
_CHUNK = 500
T = TypeVar("T")


@dataclass
class ReconciliationInput:
    carrier_id: str
    day: str  # YYYY-MM-DD, a UTC day


def _taken(session: Session, key: str) -> int:
    entry = ledger.find_by_key(session, key)
    return entry.amount_minor if entry is not None else 0


@dataclass
class SettledByReconciliation:
    """An operation a run settled, for its workflow (``operation_settled`` signal)."""

    idempotency_key: str
    workflow_id: str
    resolution: str
    still_unsettled: int
    # what the carrier took (reconciled): its workflow delivers what was paid for
    amount_minor: int = 0


@dataclass
class ReconciliationOutput:
    carrier_id: str
    day: str
    final: bool = False
    report_rows: int = 0
    missing: int = 0
    extra: int = 0
    amount_differs: int = 0
    reconciled: int = 0
    not_charged: int = 0
    unresolved: int = 0
    # settled by this run only (a repeated run settles nothing)
    settled: list[SettledByReconciliation] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return self.missing + self.extra + self.amount_differs


class ReconciliationError(ApplicationError):
    """Our own configuration or a report that cannot be read: retrying cannot help."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="ReconciliationError", non_retryable=True)


def _chunks(values: Iterable[T]) -> Iterator[list[T]]:
    batch: list[T] = []
    for value in values:
        batch.append(value)
        if len(batch) == _CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


class ReconciliationActivities:
    def __init__(self, engine: Engine, registry: Registry, addresses: dict[str, str],
                 timeout_seconds: float = 30.0) -> None:
        """``addresses``: what report addresses refer to by name (settings.simulator_urls)."""
        self._engine = engine
        self._registry = registry
        self._addresses = addresses
        self._timeout = timeout_seconds

    # -- the report -------------------------------------------------------------------------

    async def _fetch(self, url: str) -> tuple[str, bool]:
        async with httpx.AsyncClient(timeout=self._timeout) as http:
            response = await http.get(url)
        if response.status_code == 404:
            raise ReconciliationError(f"no settlement report at {url}")
        response.raise_for_status()  # anything else: the carrier's trouble, retried
        return response.text, response.headers.get(STATUS_HEADER, "") == "final"

    async def fetch_report(self, carrier_id: str, day: date
                           ) -> tuple[list[ReportRow], bool]:
        """The carrier's report for ``day`` and whether it is final."""
        carrier = self._registry.carriers.get(carrier_id)
        if carrier is None:
            raise ReconciliationError(f"unknown carrier {carrier_id}")
        try:
            source = report_source(carrier_id, carrier.protocol)
            text, final = await self._fetch(source.url(self._addresses, day.isoformat()))
            return parse(source.format, text), final
        except (ReportFormatError, KeyError) as exc:
            raise ReconciliationError(f"{carrier_id} {day}: {exc}") from exc

    # -- what we hold -------------------------------------------------------------------------

    def _ours(self, session: Session, carrier_id: str, day: date,
              rows: list[ReportRow]) -> Ours:
        start, end = day_bounds(day)
        sent_at = sa.func.coalesce(col(CarrierOperation.last_sent_at),
                                   col(CarrierOperation.created_at))
        sent_that_day = set(session.exec(select(CarrierOperation.idempotency_key).where(
            CarrierOperation.carrier_id == carrier_id, sent_at >= start, sent_at < end)).all())
        by_message_id: dict[str, str] = {}
        for batch in _chunks({r.message_id for r in rows if r.message_id}):
            for message_id, key in session.exec(
                    select(SmppSubmission.message_id, SmppSubmission.idempotency_key).where(
                        SmppSubmission.carrier_id == carrier_id,
                        col(SmppSubmission.message_id).in_(batch))).all():
                if message_id is not None:
                    by_message_id[message_id] = key
        ledger: dict[str, LedgerSide] = {}

        def add_ledger(entries: Iterable[LedgerEntry]) -> None:
            for e in entries:
                ledger[e.idempotency_key] = LedgerSide(e.idempotency_key, str(e.kind),
                                                       e.amount_minor, e.currency,
                                                       e.carrier_reference)

        references = {r.reference for r in rows} | {r.message_id for r in rows if r.message_id}
        for batch in _chunks(references):
            add_ledger(session.exec(select(LedgerEntry).where(
                LedgerEntry.carrier_id == carrier_id,
                col(LedgerEntry.carrier_reference).in_(batch))).all())
        keys = sent_that_day | {r.key for r in rows if r.key} | set(by_message_id.values())
        operations: dict[str, OperationSide] = {}
        for batch in _chunks(keys):
            add_ledger(session.exec(select(LedgerEntry).where(
                LedgerEntry.carrier_id == carrier_id,
                col(LedgerEntry.idempotency_key).in_(batch))).all())
            found = session.exec(
                select(CarrierOperation, Subscriber.msisdn)
                .join(Subscription, col(Subscription.id) == col(CarrierOperation.subscription_id))
                .join(Subscriber, col(Subscriber.id) == col(Subscription.subscriber_id))
                .where(CarrierOperation.carrier_id == carrier_id,
                       col(CarrierOperation.idempotency_key).in_(batch))).all()
            for op, msisdn in found:
                operations[op.idempotency_key] = OperationSide(
                    op.idempotency_key, str(op.kind), str(op.state), op.outcome,
                    op.amount_minor, op.currency, msisdn, op.reported_outcome)
        return Ours(ledger, operations, by_message_id, frozenset(sent_that_day))

    # -- decisions ----------------------------------------------------------------------------

    def _reconcile(self, session: Session, decision: Reconcile) -> CarrierOperation | None:
        """The debit the carrier reports becomes the ledger entry, and the operation settled,
        in one transaction; None if anyone settled it first."""
        operation = ops.find(session, decision.key)
        if operation is None or operation.state != OperationState.UNSETTLED:
            return None
        table = CarrierOperation.__table__  # type: ignore[attr-defined]
        moved = session.execute(
            sa.update(table)
            .where(table.c.idempotency_key == decision.key,
                   table.c.state == OperationState.UNSETTLED.value)
            .values(state=OperationState.SETTLED.value, outcome="succeeded",
                    carrier_reference=decision.carrier_reference, carrier_code=RECONCILED_CODE,
                    message="settled by reconciliation: in the carrier's settlement report",
                    updated_at=utcnow()))
        if not moved.rowcount:  # type: ignore[attr-defined]
            session.rollback()
            return None
        partial = decision.amount_minor < operation.amount_minor
        entry = LedgerEntry(
            idempotency_key=decision.key, kind=LedgerKind.RECONCILED,
            subscription_id=operation.subscription_id, cycle=operation.cycle,
            carrier_id=operation.carrier_id, amount_minor=decision.amount_minor,
            currency=decision.currency, carrier_reference=decision.carrier_reference,
            list_price_minor=operation.amount_minor if partial else None,
            due_at=operation.due_at)
        try:
            # the entry and its traceability document, committed with the transition
            written = ledger.append(session, entry, commit=False)
            if written is not entry:  # the key is in the ledger already: that entry stands
                session.rollback()
                return None
            session.commit()
        except (IntegrityError, ledger.LedgerConflict):
            session.rollback()
            return None
        return operation

    def _close(self, session: Session, key: str, day: date) -> CarrierOperation | None:
        """Closes an unsettled charge the carrier's final report does not show, as long as no
        ledger row exists for its key."""
        table = CarrierOperation.__table__  # type: ignore[attr-defined]
        ledger_table = LedgerEntry.__table__  # type: ignore[attr-defined]
        moved = session.execute(
            sa.update(table)
            .where(table.c.idempotency_key == key,
                   table.c.state == OperationState.UNSETTLED.value,
                   ~sa.exists().where(ledger_table.c.idempotency_key == key))
            .values(state=OperationState.SETTLED.value, outcome="rejected",
                    carrier_code=NOT_CHARGED_CODE,
                    message=f"closed by reconciliation: not in the carrier's final "
                            f"settlement report for {day.isoformat()}",
                    updated_at=utcnow()))
        session.commit()
        return ops.find(session, key) if moved.rowcount else None  # type: ignore[attr-defined]

    # -- the stored report --------------------------------------------------------------------

    def _run_row(self, session: Session, carrier_id: str, day: date) -> ReconciliationRun:
        query = select(ReconciliationRun).where(ReconciliationRun.carrier_id == carrier_id,
                                                ReconciliationRun.day == day)
        run = session.exec(query).first()
        if run is not None:
            return run
        session.add(ReconciliationRun(carrier_id=carrier_id, day=day))
        try:
            session.commit()
        except IntegrityError:  # another run of the same day created it
            session.rollback()
        run = session.exec(query).first()
        assert run is not None
        return run

    def _store(self, session: Session, run: ReconciliationRun, items: list[Item], final: bool,
               report_rows: int) -> ReconciliationRun:
        """Keeps every decision ever taken; replaces unresolved findings by what this run saw.
        Nothing is written when nothing changed."""
        assert run.id is not None
        stored = {(i.kind, i.match_key): i for i in session.exec(
            select(ReconciliationItem).where(ReconciliationItem.run_id == run.id)).all()}
        seen = {(str(i.kind), i.match_key): i for i in items}
        changed = False
        for identity, item in seen.items():
            values: dict[str, Any] = {
                "idempotency_key": item.idempotency_key,
                "carrier_reference": item.carrier_reference,
                "ledger_amount_minor": item.ledger_amount_minor,
                "report_amount_minor": item.report_amount_minor, "currency": item.currency,
                "resolution": item.resolution.value if item.resolution else None,
                "detail": item.detail[:500]}
            row = stored.get(identity)
            if row is None:
                session.add(ReconciliationItem(run_id=run.id, kind=item.kind.value,
                                               match_key=item.match_key, **values))
                changed = True
            elif row.resolution is None and any(
                    getattr(row, name) != value for name, value in values.items()):
                for name, value in values.items():
                    setattr(row, name, value)
                session.add(row)
                changed = True
        for identity, row in stored.items():
            if row.resolution is None and identity not in seen:
                session.delete(row)  # no longer true (a preliminary report grew, say)
                changed = True
        if changed:
            session.commit()
        current = session.exec(
            select(ReconciliationItem).where(ReconciliationItem.run_id == run.id)).all()
        counts = {
            "final": run.final or final, "report_rows": report_rows,
            "missing": sum(i.kind == ItemKind.MISSING for i in current),
            "extra": sum(i.kind == ItemKind.EXTRA for i in current),
            "amount_differs": sum(i.kind == ItemKind.AMOUNT_DIFFERS for i in current),
            "reconciled": sum(i.resolution == Resolution.RECONCILED for i in current),
            "not_charged": sum(i.resolution == Resolution.NOT_CHARGED for i in current),
            "unresolved": sum(i.resolution is None for i in current)}
        if any(getattr(run, name) != value for name, value in counts.items()):
            for name, value in counts.items():
                setattr(run, name, value)
            run.updated_at = utcnow()
            session.add(run)
            session.commit()
            session.refresh(run)
        return run

    def _apply(self, carrier_id: str, day: date, rows: list[ReportRow], final: bool,
               next_rows: list[ReportRow]) -> ReconciliationOutput:
        with Session(self._engine, expire_on_commit=False) as session:
            ours = self._ours(session, carrier_id, day, rows + next_rows)
            found = compare(rows, final, ours, next_rows)
            applied: dict[str, tuple[CarrierOperation, Resolution]] = {}
            for decision in found.reconcile:
                operation = self._reconcile(session, decision)
                if operation is not None:
                    applied[decision.key] = (operation, Resolution.RECONCILED)
            for key in found.close:
                closed = self._close(session, key, day)
                if closed is not None:
                    applied[key] = (closed, Resolution.NOT_CHARGED)
            # a decision someone else's settlement overtook is not ours to report: the next
            # run compares with what that settlement wrote
            items = [i for i in found.items
                     if i.resolution is None or i.idempotency_key in applied]
            run = self._store(session, self._run_row(session, carrier_id, day), items, final,
                              len(rows))
            settled = [
                SettledByReconciliation(key, operation.workflow_id, resolution.value,
                                        len(ops.unsettled_charges(session,
                                                                  operation.subscription_id)),
                                        _taken(session, key))
                for key, (operation, resolution) in applied.items()]
            return ReconciliationOutput(
                carrier_id, day.isoformat(), run.final, run.report_rows, run.missing, run.extra,
                run.amount_differs, run.reconciled, run.not_charged, run.unresolved, settled)

    # -- activities ---------------------------------------------------------------------------

    @activity.defn(name="reconcile_carrier_day")
    async def reconcile_carrier_day(self, request: ReconciliationInput) -> ReconciliationOutput:
        """Compares ``request.carrier_id``'s report for ``request.day`` with our books, decides
        the charges of that day left unsettled, and stores the findings."""
        try:
            day = date.fromisoformat(request.day)
        except ValueError:
            raise ReconciliationError(f"not a day: {request.day!r}") from None
        rows, final = await self.fetch_report(request.carrier_id, day)
        # evidence only, never decided on: a request sent near midnight may be booked the day
        # after, and one first sent the day before may be booked then and resent today
        next_rows, _ = await self.fetch_report(request.carrier_id, day + timedelta(days=1))
        previous_rows, _ = await self.fetch_report(request.carrier_id, day - timedelta(days=1))
        return await in_db_thread(self._engine, self._apply, request.carrier_id, day, rows,
                                  final, [*next_rows, *previous_rows])

    def all(self) -> list[Any]:
        return [self.reconcile_carrier_day]
