"""The traceability outbox: documents written in the same transaction as their rows, drained
in bulk into a real OpenSearch-speaking server (osmem-server on a socket), surviving its
outage, idempotent on re-delivery, and never holding a plain MSISDN."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from opensearchpy import OpenSearch
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from carriers.http import InteractionRecord
from carriers.loader import default_registry
from models import ledger
from models.db import make_engine, migrate
from models.inbound_sms import InboundSms, finish_inbound, reserve_notice, settle_notice, store_inbound
from models.interactions import InteractionStore
from models.interactions import held as held_interactions
from models.outbox import OutboxEntry
from models.seed import seed_reference_data
from models.tables import (
    CarrierInteraction,
    LedgerEntry,
    LedgerKind,
    Subscriber,
    Subscription,
)
from tests.opensearch_server import OpenSearchProcess
from traceability.documents import msisdn_hash, rule_decision_document
from traceability.indexer import OutboxDrainer, ensure_templates, indexed_counts, make_client
from traceability.outbox import backlog, enqueue

_numbers = iter(range(2_000_000, 2_999_999))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('trace') / 'trace.db'}"
    else:  # a database of its own on the session's private server
        server_url: str = request.getfixturevalue("postgres_url")
        name = f"trace_{uuid.uuid4().hex[:8]}"
        with make_engine(server_url).connect().execution_options(
                isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        url = server_url.rsplit("/", 1)[0] + f"/{name}"
    migrate(url)
    engine = make_engine(url)
    seed_reference_data(engine, default_registry())
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def opensearch() -> Iterator[OpenSearchProcess]:
    server = OpenSearchProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def search(opensearch: OpenSearchProcess) -> Iterator[OpenSearch]:
    if not opensearch.running:
        opensearch.start()
    client = make_client(opensearch.url, timeout_seconds=3)
    client.indices.delete(index="cb-interactions-*", params={"expand_wildcards": "all"})
    yield client
    client.close()


def drained(db: Engine, client: OpenSearch) -> None:
    """Marks everything earlier tests left, so each test counts only its own rows."""
    with Session(db) as session:
        session.execute(sa.update(OutboxEntry).values(indexed_at=datetime.now(UTC)))
        session.commit()


def subscription(db: Engine) -> tuple[Subscription, str]:
    msisdn = f"+3361{next(_numbers):07d}"
    with Session(db, expire_on_commit=False) as session:
        subscriber = Subscriber(msisdn=msisdn, carrier_id="fr-azur", timezone="Europe/Paris",
                                locale="fr-FR")
        session.add(subscriber)
        session.flush()
        assert subscriber.id is not None
        sub = Subscription(subscriber_id=subscriber.id, product_id="game-pass",
                           price_point_id="fr-azur-pass-monthly")
        session.add(sub)
        session.commit()
    return sub, msisdn


def record(sub: Subscription, msisdn: str, operation: str = "charge", latency: int = 42,
           cycle: int = 1) -> InteractionRecord:
    # a body the transport already redacted, and a URL that still carries the raw number:
    # the document's redaction must not depend on the transport's alone
    return InteractionRecord(
        carrier_id="fr-azur", operation=operation,
        idempotency_key=f"dev-{sub.key_token}-c{cycle}-a0", method="POST",
        url=f"/payment/v1/{msisdn}/transactions/amount",
        request_body='{"amount": "4.99"}', status_code=201,
        response_body=f'{{"status": "charged", "endUserId": "tel:{msisdn}"}}',
        outcome="succeeded", error=None, latency_ms=latency)


def charge(sub: Subscription, key: str, amount: int = 499,
           list_price: int | None = None) -> LedgerEntry:
    assert sub.id is not None
    return LedgerEntry(idempotency_key=key, kind=LedgerKind.CHARGE, subscription_id=sub.id,
                       cycle=1, carrier_id="fr-azur", amount_minor=amount, currency="EUR",
                       carrier_reference="ref-1", due_at=datetime(2027, 1, 31, tzinfo=UTC),
                       list_price_minor=list_price)


def outbox_rows(db: Engine, doc_prefix: str = "") -> list[OutboxEntry]:
    with Session(db) as session:
        return list(session.exec(select(OutboxEntry).where(
            col(OutboxEntry.doc_id).startswith(doc_prefix)).order_by(col(OutboxEntry.id))).all())


def sources(client: OpenSearch) -> list[dict[str, Any]]:
    client.indices.refresh(index="cb-interactions-*")
    found = client.search(index="cb-interactions-*", body={"size": 1000, "query": {"match_all": {}}})
    return [{"_id": hit["_id"], **hit["_source"]} for hit in found["hits"]["hits"]]


# -- written with the row -------------------------------------------------------------------


async def test_an_interaction_and_its_document_commit_together_or_not_at_all(
    db: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sub, msisdn = subscription(db)
    store = InteractionStore(db)
    await store.record(record(sub, msisdn))
    with Session(db) as session:
        row = session.exec(select(CarrierInteraction).order_by(
            col(CarrierInteraction.id).desc())).first()
        assert row is not None
    [entry] = outbox_rows(db, f"interaction-{row.id}")
    document = json.loads(entry.document)
    assert entry.doc_id == f"interaction-{row.id}"
    assert entry.index_name == f"cb-interactions-{row.created_at:%Y.%m.%d}"
    assert document["event"] == "carrier_call" and document["country"] == "FR"
    assert document["subscription_id"] == sub.id and document["cycle"] == 1
    assert document["product"] == "game-pass" and document["latency_ms"] == 42
    assert document["msisdn_hash"] == msisdn_hash(msisdn)

    # the outbox insert fails: the interaction is not written either
    def broken(session: Session, _document: object) -> None:
        session.add(OutboxEntry(doc_id="x", index_name="x", document=None))  # type: ignore[arg-type]

    monkeypatch.setattr("models.interactions.enqueue", broken)
    with Session(db) as session:
        before = session.exec(select(sa.func.count()).select_from(CarrierInteraction)).one()
    with pytest.raises(IntegrityError):
        await store.record(record(sub, msisdn, operation="refund"))
    with Session(db) as session:
        after = session.exec(select(sa.func.count()).select_from(CarrierInteraction)).one()
    assert after == before


async def test_exchanges_held_for_a_conclusion_are_only_the_holding_tasks_own(db: Engine) -> None:
    """A charge holds its exchanges to commit them with its conclusion. A task it started (an
    SMPP session's reader, whose receipts come for other charges later) inherits the holding's
    context but not the holding: its exchanges are written at once, as are any recorded after
    the holding closed, and what the holder never concluded is written when it lets go."""
    sub, msisdn = subscription(db)
    store = InteractionStore(db)

    def stored() -> list[int]:
        with Session(db) as session:
            return [r.latency_ms for r in session.exec(select(CarrierInteraction)).all()]

    before = stored()
    reader: asyncio.Task[None] | None = None
    later = asyncio.Event()

    async def read_receipts() -> None:
        await store.record(record(sub, msisdn, operation="receipt", latency=2))
        await later.wait()
        await store.record(record(sub, msisdn, operation="receipt", latency=3))

    async with held_interactions(db) as exchanges:
        await store.record(record(sub, msisdn, latency=1))
        reader = asyncio.ensure_future(read_receipts())
        await asyncio.sleep(0.05)
        assert exchanges == [record(sub, msisdn, latency=1)]
        assert sorted(set(stored()) - set(before)) == [2]
    assert sorted(set(stored()) - set(before)) == [1, 2]  # written on letting go
    later.set()
    await asyncio.wait_for(reader, 5)
    assert sorted(set(stored()) - set(before)) == [1, 2, 3]


def test_a_ledger_entry_queues_one_document_and_a_repeated_key_none(db: Engine) -> None:
    sub, _ = subscription(db)
    key = f"dev-{sub.key_token}-c1-a0"
    with Session(db) as session:
        first = ledger.append(session, charge(sub, key, amount=250, list_price=499))
    with Session(db) as session:
        again = ledger.append(session, charge(sub, key, amount=250, list_price=499))
    assert again.id == first.id
    with Session(db) as session, pytest.raises(ledger.LedgerConflict):
        ledger.append(session, charge(sub, key, amount=999))
    [entry] = outbox_rows(db, f"ledger-{first.id}")
    document = json.loads(entry.document)
    assert document["event"] == "ledger" and document["operation"] == "charge"
    assert (document["amount_minor"], document["currency"]) == (250, "EUR")
    assert document["partial"] is True and document["idempotency_key"] == key
    assert 0 <= document["local_hour"] <= 23


def test_sms_rows_queue_their_documents_when_written_and_settled(db: Engine) -> None:
    sub, msisdn = subscription(db)
    with Session(db, expire_on_commit=False) as session:
        row = store_inbound(session, InboundSms(
            carrier_id="gb-mersey", dedup_key=f"id:{uuid.uuid4()}", msisdn=msisdn,
            short_code="84422", text=f"STOP from {msisdn}"))
        assert row.id is not None
        assert finish_inbound(session, row.id, "handled", "stop", "cancelled 1")
        assert not finish_inbound(session, row.id, "handled", "stop", "again")  # acted once
        key = f"dev-{sub.key_token}-welcome"
        notice, may_send = reserve_notice(session, key, "gb-mersey", msisdn, "welcome", "en")
        assert may_send and notice.id is not None
        settle_notice(session, key, "sent", "succeeded:")
    stored, settled = outbox_rows(db, f"sms_inbound-{row.id}")
    assert json.loads(stored.document)["outcome"] == "received"
    assert json.loads(settled.document)["outcome"] == "handled"
    assert stored.index_name == settled.index_name  # one document, overwritten in place
    [sent] = outbox_rows(db, f"sms_notice-{notice.id}-")
    document = json.loads(sent.document)
    assert document["event"] == "sms_notice" and document["outcome"] == "sent"
    assert document["subscription_id"] == sub.id  # found through the key's token


# -- drained into OpenSearch ----------------------------------------------------------------


async def test_the_drain_indexes_in_bulk_batches_under_the_templates_mapping(
    db: Engine, search: OpenSearch,
) -> None:
    drained(db, search)
    sub, msisdn = subscription(db)
    store = InteractionStore(db)
    for latency in (10, 20, 30, 40, 500):
        await store.record(record(sub, msisdn, latency=latency))
    with Session(db) as session:
        ledger.append(session, charge(sub, f"dev-{sub.key_token}-c1-a0"))
    drainer = OutboxDrainer(db, search, batch_size=4, refresh=True)
    assert [drainer.drain_once(), drainer.drain_once(), drainer.drain_once()] == [4, 2, 0]
    assert backlog(db) == 0

    template = search.indices.get_index_template(name="cb-interactions")["index_templates"][0]
    properties = template["index_template"]["template"]["mappings"]["properties"]
    assert properties["carrier"]["type"] == "keyword"
    assert properties["amount_minor"]["type"] == "long"
    mappings = search.indices.get_mapping(index="cb-interactions-*")
    [(index, mapping)] = mappings.items()
    assert index == f"cb-interactions-{datetime.now(UTC):%Y.%m.%d}"
    fields = mapping["mappings"]["properties"]
    assert {name: fields[name]["type"] for name in (
        "@timestamp", "carrier", "msisdn_hash", "latency_ms", "amount_minor", "partial",
        "detail")} == {"@timestamp": "date", "carrier": "keyword", "msisdn_hash": "keyword",
                       "latency_ms": "integer", "amount_minor": "long", "partial": "boolean",
                       "detail": "text"}

    stats = search.search(index="cb-interactions-*", body={"size": 0, "aggs": {
        "events": {"terms": {"field": "event"}},
        "latency": {"percentiles": {"field": "latency_ms", "percents": [50]}}}})
    buckets = {b["key"]: b["doc_count"] for b in stats["aggregations"]["events"]["buckets"]}
    assert buckets == {"carrier_call": 5, "ledger": 1}
    assert stats["aggregations"]["latency"]["values"]["50.0"] == pytest.approx(30, abs=10)
    assert indexed_counts(db, search)[0] == 6


async def test_an_outage_loses_nothing_and_the_backlog_drains_on_return(
    db: Engine, search: OpenSearch, opensearch: OpenSearchProcess,
) -> None:
    drained(db, search)
    sub, msisdn = subscription(db)
    opensearch.stop()
    store = InteractionStore(db)
    for cycle in range(1, 8):
        await store.record(record(sub, msisdn, cycle=cycle))
    drainer = OutboxDrainer(db, search, batch_size=5, refresh=True)
    assert drainer.drain_once() == 0
    assert drainer.last_error is not None and backlog(db) == 7

    opensearch.start()  # back, and empty: the template is put again before any document
    assert drainer.drain_once() + drainer.drain_once() == 7
    assert drainer.last_error is None and backlog(db) == 0
    assert sorted(d["cycle"] for d in sources(search)) == list(range(1, 8))
    mapping = search.indices.get_mapping(index="cb-interactions-*")
    assert all(m["mappings"]["dynamic"] == "strict" for m in mapping.values())


async def test_redelivered_rows_leave_one_document_each_and_the_newest_version_wins(
    db: Engine, search: OpenSearch,
) -> None:
    drained(db, search)
    sub, msisdn = subscription(db)
    await InteractionStore(db).record(record(sub, msisdn))
    with Session(db, expire_on_commit=False) as session:
        row = store_inbound(session, InboundSms(
            carrier_id="gb-mersey", dedup_key=f"id:{uuid.uuid4()}", msisdn=msisdn,
            short_code="84422", text="STOP"))
        assert row.id is not None
        finish_inbound(session, row.id, "handled", "stop", "cancelled 1")
    drainer = OutboxDrainer(db, search, batch_size=100, refresh=True)
    assert drainer.drain_once() == 3
    first = sorted(sources(search), key=lambda d: d["_id"])
    assert len(first) == 2

    # a crash after the bulk call, before the rows were marked: all of it is sent again
    with Session(db) as session:
        session.execute(sa.update(OutboxEntry).where(
            col(OutboxEntry.id).in_([r.id for r in outbox_rows(db)][-3:])).values(indexed_at=None))
        session.commit()
    assert drainer.drain_once() == 3  # conflicts on the same ids count as delivered
    again = sorted(sources(search), key=lambda d: d["_id"])
    assert again == first
    inbound = next(d for d in again if d["_id"] == f"sms_inbound-{row.id}")
    assert inbound["outcome"] == "handled"  # the stored version never overwrote the settled one
    assert indexed_counts(db, search)[0] == 2


async def test_documents_never_hold_a_plain_msisdn(db: Engine, search: OpenSearch) -> None:
    drained(db, search)
    sub, msisdn = subscription(db)
    await InteractionStore(db).record(record(sub, msisdn))
    with Session(db) as session:
        ledger.append(session, charge(sub, f"dev-{sub.key_token}-c1-a0"))
        store_inbound(session, InboundSms(
            carrier_id="gb-mersey", dedup_key=f"id:{uuid.uuid4()}", msisdn=msisdn,
            short_code="84422", text=f"my number is {msisdn}, please STOP"))
        assert sub.id is not None
        enqueue(session, rule_decision_document(
            session, idempotency_key=f"dev-{sub.key_token}-c2-a0", carrier_id="fr-azur",
            subscription_id=sub.id, rule="per_day", outcome="refused", at=datetime.now(UTC),
            amount_minor=499, currency="EUR", detail=f"cap reached for {msisdn}"))
        session.commit()
    OutboxDrainer(db, search, refresh=True).drain_once()
    documents = [d for d in sources(search) if d.get("msisdn_hash") == msisdn_hash(msisdn)]
    assert {d["event"] for d in documents} == {"carrier_call", "ledger", "sms_inbound",
                                               "rule_decision"}
    text = json.dumps(documents)
    assert msisdn not in text and msisdn.lstrip("+") not in text
    assert all(d["msisdn_masked"] == f"+33{'*' * 7}{msisdn[-2:]}" for d in documents)


def test_templates_are_put_idempotently(search: OpenSearch) -> None:
    assert ensure_templates(search) is False  # osmem has no ISM plugin: template only
    assert ensure_templates(search) is False
    [template] = search.indices.get_index_template(name="cb-interactions")["index_templates"]
    assert template["index_template"]["index_patterns"] == ["cb-interactions-*"]
    assert "cb-interactions" in template["index_template"]["template"]["aliases"]
