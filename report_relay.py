"""Relays results carriers push to us (callbacks, delivery receipts) to the operation they are
for, and records each one as an interaction.

A report is bound to an operation we sent: its key must name one of our operations, and the
carrier it came from (authenticated by that carrier's own credential) must be the operation's
carrier. It is kept on the operation record first, so it is read even if the signal that
announces it reaches no one; an operation already left unsettled is settled by a
``LateSettlementWorkflow``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial

from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from activities.messages import LateSettlementInput
from carriers.http import InteractionRecord, InteractionSink
from carriers.reports import CarrierReport
from models import operations as ops
from models.db import in_db_lane
from models.tables import CarrierOperation, OperationState
from workflows.late_settlement import LateSettlementWorkflow, late_settlement_id

log = logging.getLogger(__name__)


class ReportRelay:
    def __init__(self, client: Client, engine: Engine, sink: InteractionSink,
                 task_queue: str, lane: str = "main") -> None:
        self._client = client
        self._engine = engine
        self._lane = lane  # (models/db.py in_db_lane)
        self._sink = sink
        self._task_queue = task_queue

    def _bind(self, report: CarrierReport) -> CarrierOperation | None:
        """Stores the report on its operation, then reads the operation's state: a workflow
        giving up at the same moment writes UNSETTLED, then reads the report, so one of the
        two always sees the other."""
        with Session(self._engine, expire_on_commit=False) as session:
            operation = ops.find(session, report.idempotency_key)
            if operation is None or operation.carrier_id != report.carrier_id:
                return operation
            ops.store_report(session, report.idempotency_key, report.outcome,
                             report.carrier_reference, report.carrier_code)
            session.expire_all()
            return ops.find(session, report.idempotency_key)

    async def relay(self, report: CarrierReport, record: InteractionRecord) -> str:
        """'relayed', 'settling' (late result for an unsettled operation), 'late' (already
        settled, or no one waits: harmless), 'unroutable' (not our key), or 'refused' (the
        operation belongs to another carrier)."""
        if not report.carrier_id:  # receipts come on the carrier's own bound session
            report = replace(report, carrier_id=record.carrier_id)
        operation = await in_db_lane(self._engine, self._lane, partial(self._bind, report))
        if operation is None:
            delivered = "unroutable"
        elif operation.carrier_id != report.carrier_id:
            log.warning("refused a result from %s for an operation of %s", report.carrier_id,
                        operation.carrier_id)
            delivered = "refused"
        elif operation.state == OperationState.SETTLED:
            delivered = "late"
        elif operation.state == OperationState.UNSETTLED:
            await self._client.start_workflow(
                LateSettlementWorkflow.run,
                LateSettlementInput(operation.idempotency_key, report),
                id=late_settlement_id(operation.idempotency_key), task_queue=self._task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                static_summary=f"settle {operation.idempotency_key} by a late result")
            delivered = "settling"
        else:
            try:
                await self._client.get_workflow_handle(operation.workflow_id).signal(
                    "carrier_result", report)
                delivered = "relayed"
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise  # Temporal unreachable: the caller must not acknowledge it as done
                log.info("result for %s not relayed: %s", operation.workflow_id, exc.message)
                delivered = "late"
        await self._sink(record.model_copy(update={
            "outcome": f"{report.outcome} ({delivered})"}))
        return delivered
