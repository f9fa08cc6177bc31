"""Database round trips per charge stay where they were brought down to (counts, not timings:
``bench/roundtrips.py``), and the conclusion written in one transaction keeps a repeated
ledger key harmless."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from bench.roundtrips import bench, measure
from carriers.base import OperationResult, Outcome
from models import operations as ops
from models.operations import OperationSpec
from models.outbox import OutboxEntry
from models.tables import CarrierInteraction, LedgerEntry, LedgerKind, OperationState

# (statements, commits) of one successful charge: operation, ledger and subscription with its
# subscriber read, operation recorded; then the ledger entry and its document, the carrier's
# interaction and its document, and the operation settled, together. Caps add the
# subscriber's lock and the spend read.
WITHOUT_RULES = (9, 2)
WITH_RULES = (13, 2)


@pytest.mark.parametrize(("rules", "most"), [(False, WITHOUT_RULES), (True, WITH_RULES)])
async def test_a_charge_takes_no_more_round_trips_than_counted(
        rules: bool, most: tuple[int, int]) -> None:
    first, again = await measure("fr-azur", rules)
    for counts in (first, again):
        assert counts.statements <= most[0] and counts.commits <= most[1], counts.texts


async def test_a_conclusion_written_twice_keeps_one_entry_and_one_document(
        tmp_path: Path) -> None:
    async with bench("fr-azur", False, tmp_path) as b:
        subscriber_id, subscription_id, token, price = await asyncio.to_thread(b.subscribe)
        charge = b.charge_input(subscriber_id, subscription_id, token, price, 1)
        out = await b.charge(charge)
        assert out.outcome == "succeeded" and out.carrier_reference

        def conclude_again() -> None:
            with Session(b.engine, expire_on_commit=False) as session:
                operation = ops.find(session, charge.idempotency_key)
            assert operation is not None
            b.activities._conclude(operation, OperationResult(
                outcome=Outcome.SUCCEEDED, carrier_reference=out.carrier_reference))

        await asyncio.to_thread(conclude_again)
        with Session(b.engine) as session:
            entries = session.exec(select(LedgerEntry).where(
                LedgerEntry.idempotency_key == charge.idempotency_key)).all()
            operation = ops.find(session, charge.idempotency_key)
            ledger_docs = [row for row in session.exec(select(OutboxEntry)).all()
                           if row.doc_id.startswith("ledger-")]
        assert len(entries) == 1 and len(ledger_docs) == 1
        assert operation is not None and operation.state == OperationState.SETTLED
        assert operation.carrier_reference == out.carrier_reference


async def test_a_conclusion_that_fails_to_settle_leaves_no_ledger_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger entry commits with the operation's transition or not at all."""
    async with bench("fr-azur", False, tmp_path) as b:
        subscriber_id, subscription_id, token, price = await asyncio.to_thread(b.subscribe)
        charge = b.charge_input(subscriber_id, subscription_id, token, price, 1)
        spec = OperationSpec(
            idempotency_key=charge.idempotency_key, kind=LedgerKind.CHARGE,
            carrier_id=charge.carrier_id, workflow_id="wf", subscription_id=subscription_id,
            cycle=1, amount_minor=charge.amount_minor, currency=charge.currency,
            due_at=charge.due_at)
        with Session(b.engine, expire_on_commit=False) as session:
            operation = ops.reserve(session, spec).operation

        def broken(session: Session, *args: Any, **kwargs: Any) -> bool:
            session.flush()
            raise RuntimeError("the database went away")

        monkeypatch.setattr(ops, "transition", broken)
        with pytest.raises(RuntimeError):
            b.activities._conclude(operation, OperationResult(
                outcome=Outcome.SUCCEEDED, carrier_reference="ref-1"))
        with Session(b.engine) as session:
            assert session.exec(select(LedgerEntry).where(
                LedgerEntry.idempotency_key == charge.idempotency_key)).first() is None
            assert not [row for row in session.exec(select(OutboxEntry)).all()
                        if row.doc_id.startswith("ledger-")]
            found = ops.find(session, charge.idempotency_key)
            assert found is not None and found.state == OperationState.SENDING


async def test_the_carriers_exchange_is_recorded_even_when_the_conclusion_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exchange waits to commit with the conclusion; a conclusion that fails writes it on
    its own, and the operation stays open (sending) for settling."""
    async with bench("fr-azur", False, tmp_path) as b:
        subscriber_id, subscription_id, token, price = await asyncio.to_thread(b.subscribe)
        charge = b.charge_input(subscriber_id, subscription_id, token, price, 1)

        def broken(session: Session, *args: Any, **kwargs: Any) -> bool:
            raise RuntimeError("the database went away")

        monkeypatch.setattr(ops, "transition", broken)
        with pytest.raises(RuntimeError):
            await b.charge(charge)
        with Session(b.engine) as session:
            calls = session.exec(select(CarrierInteraction).where(
                CarrierInteraction.idempotency_key == charge.idempotency_key)).all()
            documents = [row.doc_id for row in session.exec(select(OutboxEntry)).all()]
            found = ops.find(session, charge.idempotency_key)
        assert [(c.operation, c.outcome) for c in calls] == [("charge", "succeeded")]
        assert f"interaction-{calls[0].id}" in documents
        assert not [d for d in documents if d.startswith("ledger-")]
        assert found is not None and found.state == OperationState.SENDING
