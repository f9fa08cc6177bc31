"""ReconciliationWorkflow: one carrier's settlement report for one day against our books
(``activities/reconciliation.py``), then tells each subscription workflow whose charge it
settled. DailyReconciliationWorkflow: what the daily schedule starts, one reconciliation per
carrier for the previous day (UTC)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import FailureError

with workflow.unsafe.imports_passed_through():
    from activities.messages import SettledNotice
    from activities.reconciliation import (
        ReconciliationActivities,
        ReconciliationInput,
        ReconciliationOutput,
    )
    from workflows.settle import tell_settled


def reconciliation_id(carrier_id: str, day: str) -> str:
    return f"reconcile-{carrier_id}-{day}"


@workflow.defn(name="ReconciliationWorkflow")
class ReconciliationWorkflow:
    @workflow.run
    async def run(self, request: ReconciliationInput) -> ReconciliationOutput:
        result = await workflow.execute_activity_method(
            ReconciliationActivities.reconcile_carrier_day, request,
            start_to_close_timeout=timedelta(minutes=5),
            schedule_to_close_timeout=timedelta(hours=6),
            retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=5),
                                     non_retryable_error_types=["ReconciliationError"]),
            summary=f"reconcile {request.carrier_id} {request.day}")
        for settled in result.settled:
            if not settled.workflow_id:
                continue
            await tell_settled(settled.workflow_id, SettledNotice(
                settled.idempotency_key, settled.still_unsettled,
                "succeeded" if settled.amount_minor else "rejected", settled.amount_minor))
        return result


@dataclass
class DailyReconciliationInput:
    carriers: list[str]
    # the day to reconcile (YYYY-MM-DD); None: the day before the scheduled time (UTC)
    day: str | None = None


@dataclass
class DailyReconciliationOutput:
    day: str
    results: list[ReconciliationOutput] = field(default_factory=list)
    # carriers whose reconciliation failed (the others still ran)
    failed: list[str] = field(default_factory=list)


@workflow.defn(name="DailyReconciliationWorkflow")
class DailyReconciliationWorkflow:
    @workflow.run
    async def run(self, request: DailyReconciliationInput) -> DailyReconciliationOutput:
        day = request.day or (workflow.now() - timedelta(days=1)).date().isoformat()

        async def one(carrier_id: str) -> ReconciliationOutput | None:
            try:
                return await workflow.execute_child_workflow(
                    ReconciliationWorkflow.run, ReconciliationInput(carrier_id, day),
                    id=reconciliation_id(carrier_id, day),
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
            except FailureError:
                workflow.logger.warning("reconciliation of %s for %s failed", carrier_id, day)
                return None

        results = await asyncio.gather(*(one(c) for c in request.carriers))
        return DailyReconciliationOutput(
            day, [r for r in results if r is not None],
            [c for c, r in zip(request.carriers, results, strict=True) if r is None])
