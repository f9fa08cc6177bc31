"""A subscriber's payment story: the SQL ledger and operations, the interactions indexed in
OpenSearch and the subscription workflows' Temporal histories, on one time line, masked.

``payment_story`` takes an MSISDN ("+33612345678") or a subscription id ("12"); OpenSearch and
Temporal are optional (None: that part is left out and the story says so). Nothing printed
holds a plain number: every line goes through the transport's redaction, and Temporal
events are named, never their payloads."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from opensearchpy import OpenSearch
from opensearchpy.exceptions import TransportError
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.service import RPCError

from carriers.redaction import redact
from models.msisdn import mask_msisdn, normalize_msisdn
from models.tables import CarrierOperation, LedgerEntry, Subscriber, Subscription
from traceability.documents import INDEX_PATTERN, as_utc, msisdn_hash
from traceability.markers import local_activity

# workflow-task bookkeeping says nothing about the payment
_QUIET = {EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
          EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED}


@dataclass(frozen=True)
class StoryLine:
    at: datetime
    source: str  # ledger | operation | opensearch | temporal
    text: str

    def render(self) -> str:
        return f"{as_utc(self.at):%Y-%m-%d %H:%M:%S}Z  {self.source:<10} {redact(self.text)}"


@dataclass
class SubscriptionStory:
    subscription_id: int
    product: str
    price_point: str
    status: str
    started_at: datetime


@dataclass
class PaymentStory:
    """Printable: ``print(story)`` or ``story.lines()``."""

    subject: str  # the masked MSISDN
    carrier: str | None
    subscriptions: list[SubscriptionStory] = field(default_factory=list)
    events: list[StoryLine] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"payment story of {self.subject} ({self.carrier or 'unknown carrier'})"]
        for sub in self.subscriptions:
            out.append(f"  subscription {sub.subscription_id}: {sub.product} at "
                       f"{sub.price_point}, {sub.status} since {as_utc(sub.started_at):%Y-%m-%d}")
        out.extend(f"  {line.render()}" for line in sorted(self.events, key=lambda e: as_utc(e.at)))
        out.extend(f"  note: {note}" for note in self.notes)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _ledger_lines(session: Session, ids: list[int]) -> list[StoryLine]:
    lines: list[StoryLine] = []
    for entry in session.exec(select(LedgerEntry).where(col(LedgerEntry.subscription_id).in_(ids))
                              .order_by(col(LedgerEntry.id))).all():
        text = (f"{entry.kind} {entry.amount_minor} {entry.currency} (minor) sub {entry.subscription_id} "
                f"cycle {entry.cycle} ref {entry.carrier_reference}")
        if entry.list_price_minor is not None and entry.amount_minor < entry.list_price_minor:
            text += f" partial of {entry.list_price_minor}"
        lines.append(StoryLine(entry.committed_at, "ledger", text))
    for op in session.exec(select(CarrierOperation).where(
            col(CarrierOperation.subscription_id).in_(ids)).order_by(col(CarrierOperation.id))).all():
        text = (f"{op.kind} {op.amount_minor} {op.currency} cycle {op.cycle} {op.state}"
                f"{' ' + op.outcome if op.outcome else ''} sends={op.sends} key {op.idempotency_key}")
        if op.unsettled_reason:
            text += f" ({op.unsettled_reason})"
        lines.append(StoryLine(op.created_at, "operation", text))
    return lines


def _search(client: OpenSearch, ids: list[int], hashed: str, limit: int) -> list[StoryLine]:
    body = {"size": limit, "sort": [{"@timestamp": {"order": "asc"}}],
            "query": {"bool": {"should": [{"terms": {"subscription_id": ids}},
                                          {"term": {"msisdn_hash": hashed}}],
                               "minimum_should_match": 1}}}
    found = client.search(index=INDEX_PATTERN, body=body)
    lines = []
    for hit in found["hits"]["hits"]:
        doc: dict[str, Any] = hit["_source"]
        parts = [doc.get("event"), doc.get("carrier"), doc.get("operation"), doc.get("outcome")]
        if "rule" in doc:
            parts.append(f"rule={doc['rule']}")
        if "http_status" in doc:
            parts.append(f"http {doc['http_status']}")
        if "latency_ms" in doc:
            parts.append(f"{doc['latency_ms']}ms")
        if "amount_minor" in doc:
            parts.append(f"{doc['amount_minor']} {doc.get('currency', '')}".strip())
        if doc.get("detail"):
            parts.append(f"- {str(doc['detail'])[:120]}")
        lines.append(StoryLine(datetime.fromisoformat(doc["@timestamp"]), "opensearch",
                               " ".join(str(p) for p in parts if p is not None)))
    return lines


def _describe(event: HistoryEvent) -> str:
    name = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").lower()
    if event.HasField("activity_task_scheduled_event_attributes"):
        return f"{name} {event.activity_task_scheduled_event_attributes.activity_type.name}"
    local = local_activity(event)
    if local is not None:  # (a charge's id is its idempotency key)
        return f"local_activity {local.get('activity_type')} {local.get('activity_id')}"
    if event.HasField("workflow_execution_signaled_event_attributes"):
        return f"{name} {event.workflow_execution_signaled_event_attributes.signal_name}"
    if event.HasField("workflow_execution_update_accepted_event_attributes"):
        request = event.workflow_execution_update_accepted_event_attributes.accepted_request
        return f"{name} {request.input.name}"
    if event.HasField("timer_started_event_attributes"):
        seconds = event.timer_started_event_attributes.start_to_fire_timeout.ToSeconds()
        return f"{name} {seconds}s"
    if event.HasField("activity_task_failed_event_attributes"):
        failure = event.activity_task_failed_event_attributes.failure
        return f"{name}: {failure.message[:120]}"
    return name


async def _temporal_lines(client: Client, ids: list[int], notes: list[str],
                          limit: int) -> list[StoryLine]:
    lines: list[StoryLine] = []
    for sub_id in ids:
        workflow_id = f"subscription-{sub_id}"
        try:
            count = 0
            async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
                if event.event_type in _QUIET:
                    continue
                lines.append(StoryLine(event.event_time.ToDatetime(), "temporal",
                                       f"{workflow_id} {_describe(event)}"))
                count += 1
                if count >= limit:
                    notes.append(f"{workflow_id}: history cut at {limit} events")
                    break
        except RPCError as exc:
            notes.append(f"{workflow_id}: no Temporal history ({exc.status.name})")
    return lines


async def payment_story(engine: Engine, who: str, *, opensearch: OpenSearch | None = None,
                        temporal: Client | None = None, limit: int = 500) -> PaymentStory:
    """The story of an MSISDN (every subscription of its subscriber) or of one subscription."""

    def read_sql() -> tuple[Subscriber | None, list[Subscription], list[StoryLine]]:
        with Session(engine, expire_on_commit=False) as session:
            if who.strip().isdigit():
                one = session.get(Subscription, int(who))
                subs = [one] if one else []
                subscriber = session.get(Subscriber, one.subscriber_id) if one else None
            else:
                msisdn = normalize_msisdn(who.strip())
                subscriber = session.exec(select(Subscriber).where(
                    Subscriber.msisdn == msisdn)).first()
                subs = list(session.exec(select(Subscription).where(
                    Subscription.subscriber_id == subscriber.id).order_by(
                    col(Subscription.id))).all()) if subscriber else []
            ids = [s.id for s in subs if s.id is not None]
            return subscriber, subs, _ledger_lines(session, ids) if ids else []

    subscriber, subs, events = await asyncio.to_thread(read_sql)
    if subscriber is None:
        subject = mask_msisdn(who) if who.strip().startswith("+") else f"subscription {who}"
        return PaymentStory(subject, None, notes=["no such subscriber or subscription"])
    ids = [s.id for s in subs if s.id is not None]
    story = PaymentStory(mask_msisdn(subscriber.msisdn), subscriber.carrier_id, [
        SubscriptionStory(s.id, s.product_id, s.price_point_id, str(s.status), s.started_at)
        for s in subs if s.id is not None], events)
    if opensearch is None:
        story.notes.append("OpenSearch not consulted")
    else:
        hashed = msisdn_hash(subscriber.msisdn)
        try:
            story.events += await asyncio.to_thread(_search, opensearch, ids, hashed, limit)
        except TransportError as exc:
            story.notes.append(f"OpenSearch unavailable: {type(exc).__name__}")
    if temporal is None:
        story.notes.append("Temporal not consulted")
    else:
        story.events += await _temporal_lines(temporal, ids, story.notes, limit)
    return story
