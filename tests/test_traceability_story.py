"""``payment_story``: a real subscription billed by the worker against the simulator, its
interactions drained into osmem-server, told from the ledger, OpenSearch and Temporal."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opensearchpy import OpenSearch
from sqlalchemy.engine import Engine
from temporalio.testing import WorkflowEnvironment

from starter import SubscriptionClient
from tests.opensearch_server import OpenSearchProcess
from tests.workflow_helpers import ledger_of, new_msisdn, subscribe_to, until
from traceability.history import payment_story
from traceability.indexer import OutboxDrainer, indexed_counts, make_client


@pytest.fixture(scope="module")
def search() -> Iterator[OpenSearch]:
    server = OpenSearchProcess()
    server.start()
    client = make_client(server.url)
    yield client
    client.close()
    server.stop()


async def test_a_subscribers_story_joins_ledger_interactions_and_workflow_history(
    client: SubscriptionClient, engine: Engine, temporal_env: WorkflowEnvironment,
    search: OpenSearch,
) -> None:
    msisdn = new_msisdn("fr-azur", "traceability-story")
    started = await subscribe_to(client, "fr-azur-pass-monthly", msisdn)
    handle = client.handle(started.subscription_id)
    await until(temporal_env, handle, lambda s: s.charges_succeeded >= 1)
    [charge] = ledger_of(engine, started.subscription_id)

    drainer = OutboxDrainer(engine, search, batch_size=200, refresh=True)
    while drainer.drain_once():
        pass
    indexed, total = indexed_counts(engine, search)
    assert indexed == total > 0  # every document of the session's database, none twice

    story = await payment_story(engine, msisdn, opensearch=search, temporal=temporal_env.client)
    sources = {line.source for line in story.events}
    assert {"ledger", "operation", "opensearch", "temporal"} <= sources
    text = str(story)
    assert f"charge {charge.amount_minor} EUR" in text
    assert "carrier_call fr-azur charge succeeded" in text
    assert "activity_task_scheduled charge_subscription" in text
    assert msisdn not in text and msisdn.lstrip("+") not in text
    assert story.subject == f"+33{'*' * (len(msisdn) - 5)}{msisdn[-2:]}"

    # by subscription id, without OpenSearch or Temporal: the SQL part alone, said so
    alone = await payment_story(engine, str(started.subscription_id))
    assert {line.source for line in alone.events} == {"ledger", "operation"}
    assert "OpenSearch not consulted" in alone.notes and "Temporal not consulted" in alone.notes
    await client.cancel_subscription(started.subscription_id)
