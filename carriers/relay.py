"""Relays results carriers push to us (callbacks, delivery receipts) to the waiting workflow as
a ``carrier_result`` signal, and records each one as an interaction."""

from __future__ import annotations

import logging

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.messages import CarrierReport, workflow_id_for_key
from carriers.http import InteractionRecord, InteractionSink

log = logging.getLogger(__name__)


class ReportRelay:
    def __init__(self, client: Client, sink: InteractionSink) -> None:
        self._client = client
        self._sink = sink

    async def relay(self, report: CarrierReport, record: InteractionRecord) -> str:
        """'relayed', 'late' (the workflow has finished: harmless), or 'unroutable'."""
        workflow_id = workflow_id_for_key(report.idempotency_key)
        if workflow_id is None:
            delivered = "unroutable"
        else:
            try:
                await self._client.get_workflow_handle(workflow_id).signal("carrier_result",
                                                                           report)
                delivered = "relayed"
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise  # Temporal unreachable: the caller must not acknowledge it as done
                log.info("result for %s not relayed: %s", workflow_id, exc.message)
                delivered = "late"
        await self._sink(record.model_copy(update={
            "outcome": f"{report.outcome} ({delivered})"}))
        return delivered
