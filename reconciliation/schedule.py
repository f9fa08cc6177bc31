"""The daily reconciliation schedule, and a reconciliation started on demand.

One Temporal Schedule (``SCHEDULE_ID``) runs ``DailyReconciliationWorkflow`` every day at
``hour``:``minute`` UTC; it reconciles each carrier's report for the previous day, one
``ReconciliationWorkflow`` per carrier (id ``reconcile-<carrier>-<day>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleCalendarSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from activities.reconciliation import ReconciliationInput, ReconciliationOutput
from workflows.reconciliation import (
    DailyReconciliationInput,
    DailyReconciliationWorkflow,
    ReconciliationWorkflow,
    reconciliation_id,
)

SCHEDULE_ID = "reconciliation-daily"


def daily_schedule(task_queue: str, carriers: Sequence[str], hour: int = 2,
                   minute: int = 0) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            DailyReconciliationWorkflow.run, DailyReconciliationInput(sorted(carriers)),
            id=SCHEDULE_ID, task_queue=task_queue,
            execution_timeout=timedelta(hours=20),
            static_summary="reconcile yesterday's settlement reports"),
        spec=ScheduleSpec(calendars=[ScheduleCalendarSpec(
            hour=[ScheduleRange(hour)], minute=[ScheduleRange(minute)],
            comment="daily, for the previous UTC day")], time_zone_name="UTC"),
        # a day that overlaps the previous one (a slow carrier) waits for it
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.BUFFER_ONE,
                              catchup_window=timedelta(days=2)))


async def ensure_schedule(client: Client, task_queue: str, carriers: Sequence[str],
                          hour: int = 2, minute: int = 0) -> str:
    """Creates the daily schedule, or brings an existing one up to date (carriers, time,
    queue). Returns the schedule id."""
    wanted = daily_schedule(task_queue, carriers, hour, minute)
    try:
        await client.create_schedule(SCHEDULE_ID, wanted)
    except ScheduleAlreadyRunningError:
        def update(_current: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=wanted)

        await client.get_schedule_handle(SCHEDULE_ID).update(update)
    return SCHEDULE_ID


async def reconcile_now(client: Client, task_queue: str, day: date,
                        carrier_id: str) -> ReconciliationOutput:
    """Runs one carrier's reconciliation for ``day`` now and waits for it (one already running
    for that carrier and day is joined, not doubled)."""
    return await client.execute_workflow(
        ReconciliationWorkflow.run, ReconciliationInput(carrier_id, day.isoformat()),
        id=reconciliation_id(carrier_id, day.isoformat()), task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        static_summary=f"reconcile {carrier_id} {day.isoformat()} (operator)")
