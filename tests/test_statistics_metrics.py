"""The worker's Prometheus endpoint, scraped over HTTP: a tiny workflow and activity run on a
Client built on ``install_prometheus``'s runtime against the time-skipping test server, and the
scrape shows the SDK's own metrics and the platform's counters beside them."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

from temporalio import activity, workflow

# the workflow below runs in the sandbox, which re-imports this module: pass the rest through
with workflow.unsafe.imports_passed_through():
    import httpx
    import pytest
    from temporalio.testing import WorkflowEnvironment
    from temporalio.worker import Worker

    from settings import venv_binary
    from statistics_service.metrics import PLATFORM_COUNTERS, count, install_prometheus
    from tests.postgres import free_port


@activity.defn
async def charge_counted(carrier: str) -> str:
    count("charges_succeeded", 1, {"carrier": carrier})
    count("carrier_calls", 1, {"carrier": carrier, "operation": "charge", "outcome": "succeeded"})
    return "succeeded"


@workflow.defn
class CountedCharges:
    @workflow.run
    async def run(self, carrier: str, times: int) -> int:
        for _ in range(times):
            await workflow.execute_activity(charge_counted, carrier,
                                            start_to_close_timeout=timedelta(seconds=10))
        count("callbacks_received", 1, {"carrier": carrier})
        return times


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``."""
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


async def test_prometheus_scrape_shows_sdk_metrics_and_platform_counters() -> None:
    port = free_port()
    runtime = install_prometheus(port)
    env = await WorkflowEnvironment.start_time_skipping(
        runtime=runtime, test_server_existing_path=venv_binary("temporal-test-server"))
    queue = f"metrics-{uuid.uuid4()}"
    try:
        async with Worker(env.client, task_queue=queue, workflows=[CountedCharges],
                          activities=[charge_counted]):
            done = await env.client.execute_workflow(
                CountedCharges.run, args=["fr-azur", 3], id=f"counted-{uuid.uuid4()}",
                task_queue=queue)
        assert done == 3
        count("refunds", 2, {"carrier": "de-rheinfunk"})  # outside any workflow: the runtime's meter
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
    finally:
        await env.shutdown()
    assert response.status_code == 200
    text = response.text
    # the SDK's runtime metrics
    completed = _sample(text, "temporal_workflow_completed", workflow_type="CountedCharges")
    assert completed == 1
    assert _sample(text, "temporal_activity_execution_latency_count",
                   activity_type="charge_counted") == 3
    assert _sample(text, "temporal_request", operation="StartWorkflowExecution") is not None
    # the platform's counters, from an activity, a workflow and plain code
    assert _sample(text, "charges_succeeded", carrier="fr-azur") == 3
    assert _sample(text, "carrier_calls", carrier="fr-azur", outcome="succeeded") == 3
    assert _sample(text, "callbacks_received", carrier="fr-azur") == 1
    assert _sample(text, "refunds", carrier="de-rheinfunk") == 2
    assert f"# HELP charges_succeeded {PLATFORM_COUNTERS['charges_succeeded']}" in text


def test_unknown_counter_is_refused() -> None:
    with pytest.raises(KeyError, match="not a platform counter"):
        count("charges_suceeded")
