"""Runs the billing worker: subscription and refund workflows, and the billing activities."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.worker import Worker

from activities.billing import BillingActivities
from carriers.loader import Registry, default_registry
from carriers.pool import AdapterPool
from models.db import make_engine, migrate, setup_lock
from models.interactions import InteractionStore
from models.seed import seed_reference_data
from models.smpp_store import SubmissionStore
from report_relay import ReportRelay
from settings import Settings, get_settings
from workflows.late_settlement import LateSettlementWorkflow
from workflows.refund import RefundWorkflow
from workflows.subscription import SubscriptionWorkflow

WORKFLOWS = [SubscriptionWorkflow, RefundWorkflow, LateSettlementWorkflow]


def prepare_database(settings: Settings, registry: Registry) -> Engine:
    engine = make_engine(settings.database_url)
    with setup_lock(settings.database_url):
        migrate(settings.database_url)
        seed_reference_data(engine, registry)
    return engine


def make_adapter_pool(registry: Registry, settings: Settings, engine: Engine,
                      client: Client) -> AdapterPool:
    """Adapters record interactions in the database; SMPP receipts are relayed as signals."""
    interactions = InteractionStore(engine).record
    relay = ReportRelay(client, engine, interactions, settings.task_queue)
    return AdapterPool(registry, settings, interactions, SubmissionStore(engine), relay.relay)


def build_worker(
    client: Client, settings: Settings, engine: Engine, adapters: AdapterPool,
    registry: Registry | None = None,
) -> Worker:
    activities = BillingActivities(engine, adapters, registry or default_registry(),
                                   settings.deployment_id)
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=activities.all(),
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
    )


async def run_worker(settings: Settings) -> None:
    registry = default_registry()
    engine = prepare_database(settings, registry)
    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    adapters = make_adapter_pool(registry, settings, engine, client)
    adapters.start_sessions()
    try:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with build_worker(client, settings, engine, adapters, registry):
            logging.info("worker polling %s on %s", settings.task_queue, settings.temporal_address)
            await stop.wait()
            logging.info("worker stopping: finishing the tasks in hand")
    finally:
        await adapters.aclose()
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-concurrent-activities", type=int)
    parser.add_argument("--max-concurrent-workflow-tasks", type=int)
    args = parser.parse_args()
    settings = get_settings()
    overrides = {
        k: v for k, v in vars(args).items() if v is not None
    }
    settings = settings.model_copy(update=overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # httpx logs every URL at INFO, and carrier URLs hold MSISDNs: interactions are recorded
    # (redacted) by the transport instead
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(run_worker(settings))


if __name__ == "__main__":
    main()
