"""What a workflow history says about cost and latency: events and billable actions per charge
(steady state apart from start and cancellation) and where a cycle's time goes.

A history (all runs of one workflow, oldest first) is cut in three:

* start: from the first event to the first charge: its activity's ``ActivityTaskScheduled``,
  or its local activity's ``MarkerRecorded`` (a local attempt that overflowed to the carrier's
  queue and the activity scheduled for it in the same workflow task are one charge);
* steady state: whole cycles, from the first charge activity's scheduling up to (not including)
  the last one's, so the steady events per charge are those of exactly ``charges - 1`` cycles;
  a continue-as-new inside falls here, as it should;
* cancellation: from the cancel signal (or the workflow task that carried the cancel update) to
  the end.

The last cycle before the cancellation is incomplete and is counted in neither.

Latencies come from event times, all written by the server:

* timer lag: ``TimerFired`` time minus (``TimerStarted`` time + ``startToFireTimeout``);
* workflow task: ``WorkflowTaskScheduled`` → ``Started`` (queue) and → ``Completed`` (whole);
* activity schedule-to-start: ``ActivityTaskScheduled`` → ``ActivityTaskStarted`` (the started
  event is written when the activity ends, but its time is the time of the start);
* activity run: ``ActivityTaskStarted`` → ``ActivityTaskCompleted`` (last attempt); for a local
  activity, its marker's schedule time → complete time (it has no queue wait of the server's).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from traceability.markers import local_activity

BILLABLE = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: "workflow start",
    EventType.EVENT_TYPE_TIMER_STARTED: "timer",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED: "signal",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED: "update",
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES: "search-attribute upsert",
}
E = EventType


def seconds(event: HistoryEvent) -> float:
    return event.event_time.seconds + event.event_time.nanos / 1e9


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, dict):
        return None
    return float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9


def actions_of(events: Iterable[HistoryEvent]) -> Counter[str]:
    """Billable actions: starts, timers, signals, updates, upserts and activity attempts (an
    activity's ``ActivityTaskStarted`` names its attempt: attempts 1..n were all billed); the
    local activities of one workflow task are one action (Temporal Cloud's rule)."""
    actions: Counter[str] = Counter()
    local_tasks: set[int] = set()
    for event in events:
        if local_activity(event) is not None:
            local_tasks.add(event.marker_recorded_event_attributes.workflow_task_completed_event_id)
    if local_tasks:
        actions["local activities"] = len(local_tasks)
    for event in events:
        kind = BILLABLE.get(event.event_type)
        if kind:
            actions[kind] += 1
        if event.event_type == E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            actions["activity attempt"] += max(event.activity_task_started_event_attributes.attempt,
                                               1)
    return actions


def activity_key(event: HistoryEvent) -> str | None:
    """The idempotency key in a scheduled activity's JSON input, if it is plain JSON."""
    payloads = event.activity_task_scheduled_event_attributes.input.payloads
    if not payloads or payloads[0].metadata.get("encoding") != b"json/plain":
        return None
    try:
        value = json.loads(payloads[0].data)
    except ValueError:
        return None
    key = value.get("idempotency_key") if isinstance(value, dict) else None
    return key if isinstance(key, str) else None


def charge_indices(events: Sequence[HistoryEvent], activity_type: str) -> list[int]:
    """Where each charge begins: its local activity's marker, or its activity's scheduling
    when no marker of the same workflow task came before it (an overflow)."""
    found: list[int] = []
    marked_task: int | None = None
    for i, event in enumerate(events):
        data = local_activity(event)
        if data is not None and data.get("activity_type") == activity_type:
            found.append(i)
            marked_task = event.marker_recorded_event_attributes.workflow_task_completed_event_id
        elif (event.event_type == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
              and event.activity_task_scheduled_event_attributes.activity_type.name
              == activity_type):
            task = event.activity_task_scheduled_event_attributes \
                .workflow_task_completed_event_id
            if task != marked_task:
                found.append(i)
    return found


@dataclass
class Segments:
    start: list[HistoryEvent]
    steady: list[HistoryEvent]
    cancel: list[HistoryEvent]
    steady_charges: int
    complete: bool  # the history reached a close event (the cancellation is whole)


CLOSED = {
    E.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, E.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    E.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED, E.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
    E.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
}


def split(events: Sequence[HistoryEvent], activity_type: str,
          cancel_names: Iterable[str]) -> Segments:
    """Cuts a history into start, steady state and cancellation (see the module's doc)."""
    names = set(cancel_names)
    charges = charge_indices(events, activity_type)
    cancel_at = len(events)
    for i, event in enumerate(events):
        if (event.event_type == E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
                and event.workflow_execution_signaled_event_attributes.signal_name in names):
            cancel_at = i
            break
        if (event.event_type == E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
                and event.workflow_execution_update_accepted_event_attributes.accepted_request
                .input.name in names):
            # the update came with a workflow task: that task is the cancellation's
            cancel_at = i
            while cancel_at > 0 and events[cancel_at].event_type != \
                    E.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
                cancel_at -= 1
            break
    charges = [i for i in charges if i < cancel_at]
    complete = bool(events) and events[-1].event_type in CLOSED
    if not charges:
        return Segments(list(events[:cancel_at]), [], list(events[cancel_at:]), 0, complete)
    first, last = charges[0], charges[-1]
    return Segments(list(events[:first]), list(events[first:last]), list(events[cancel_at:]),
                    len(charges) - 1, complete)


@dataclass
class Latencies:
    """Samples in seconds, each list in event order."""

    timer_lag: list[float] = field(default_factory=list)
    task_queue: list[float] = field(default_factory=list)  # workflow task scheduled → started
    task_total: list[float] = field(default_factory=list)  # workflow task scheduled → completed
    activity_queue: list[float] = field(default_factory=list)  # schedule-to-start
    activity_run: list[float] = field(default_factory=list)  # started → completed
    # (idempotency key or None, run seconds) per completed charge activity
    runs_by_key: list[tuple[str | None, float]] = field(default_factory=list)

    def extend(self, other: Latencies) -> None:
        for name in ("timer_lag", "task_queue", "task_total", "activity_queue", "activity_run",
                     "runs_by_key"):
            getattr(self, name).extend(getattr(other, name))


def latencies(events: Sequence[HistoryEvent], activity_type: str,
              window: tuple[float, float] | None = None) -> Latencies:
    """Latency samples from one history; with ``window`` (epoch seconds), only those that began
    and ended inside it."""
    found = Latencies()
    by_id = {e.event_id: e for e in events}
    # a workflow task's started event by its scheduled event (some servers leave
    # WorkflowTaskCompleted.startedEventId out)
    task_started = {e.workflow_task_started_event_attributes.scheduled_event_id: e
                    for e in events if e.event_type == E.EVENT_TYPE_WORKFLOW_TASK_STARTED}

    def keep(begin: float, end: float) -> bool:
        return window is None or (window[0] <= begin and end < window[1])

    for event in events:
        kind = event.event_type
        data = local_activity(event)
        if data is not None and data.get("activity_type") == activity_type:
            scheduled_at = _timestamp(data.get("original_schedule_time"))
            completed_at = _timestamp(data.get("complete_time"))
            if scheduled_at is not None and completed_at is not None and keep(scheduled_at,
                                                                                completed_at):
                found.activity_run.append(completed_at - scheduled_at)
                key = data.get("activity_id")
                found.runs_by_key.append((key if isinstance(key, str) else None,
                                          completed_at - scheduled_at))
        if kind == E.EVENT_TYPE_TIMER_FIRED:
            started = by_id.get(event.timer_fired_event_attributes.started_event_id)
            if started is not None:
                due = seconds(started) + started.timer_started_event_attributes \
                    .start_to_fire_timeout.ToTimedelta().total_seconds()
                if keep(due, seconds(event)):
                    found.timer_lag.append(seconds(event) - due)
        elif kind == E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            attrs = event.workflow_task_completed_event_attributes
            scheduled = by_id.get(attrs.scheduled_event_id)
            started = by_id.get(attrs.started_event_id) or task_started.get(
                attrs.scheduled_event_id)
            if scheduled is not None and started is not None and keep(seconds(scheduled),
                                                                      seconds(event)):
                found.task_queue.append(seconds(started) - seconds(scheduled))
                found.task_total.append(seconds(event) - seconds(scheduled))
        elif kind == E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            done = event.activity_task_completed_event_attributes
            scheduled = by_id.get(done.scheduled_event_id)
            started = by_id.get(done.started_event_id)
            if (scheduled is None or started is None or scheduled.activity_task_scheduled_event_attributes
                    .activity_type.name != activity_type
                    or not keep(seconds(scheduled), seconds(event))):
                continue
            found.activity_queue.append(seconds(started) - seconds(scheduled))
            run = seconds(event) - seconds(started)
            found.activity_run.append(run)
            found.runs_by_key.append((activity_key(scheduled), run))
    return found


@dataclass
class HistoryTotals:
    """Sums over the sampled histories."""

    histories: int = 0
    complete: int = 0
    steady_events: int = 0
    steady_charges: int = 0
    steady_actions: Counter[str] = field(default_factory=Counter)
    start_events: int = 0
    start_actions: Counter[str] = field(default_factory=Counter)
    cancel_events: int = 0
    cancel_actions: Counter[str] = field(default_factory=Counter)
    latency: Latencies = field(default_factory=Latencies)

    def add(self, events: Sequence[HistoryEvent], activity_type: str, cancel_names: Iterable[str],
            window: tuple[float, float] | None = None) -> None:
        parts = split(events, activity_type, cancel_names)
        self.histories += 1
        self.complete += parts.complete
        self.steady_events += len(parts.steady)
        self.steady_charges += parts.steady_charges
        self.steady_actions.update(actions_of(parts.steady))
        self.start_events += len(parts.start)
        self.start_actions.update(actions_of(parts.start))
        if parts.complete:
            self.cancel_events += len(parts.cancel)
            self.cancel_actions.update(actions_of(parts.cancel))
        self.latency.extend(latencies(parts.steady, activity_type, window))

    def per_charge(self) -> tuple[float, float]:
        """(events, billable actions) per charge in the steady state."""
        charges = max(self.steady_charges, 1)
        return self.steady_events / charges, sum(self.steady_actions.values()) / charges

    def per_start(self) -> tuple[float, float]:
        n = max(self.histories, 1)
        return self.start_events / n, sum(self.start_actions.values()) / n

    def per_cancel(self) -> tuple[float, float]:
        n = max(self.complete, 1)
        return self.cancel_events / n, sum(self.cancel_actions.values()) / n
