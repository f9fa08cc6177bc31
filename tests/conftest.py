"""Shared fixtures: a real simulator on a socket, the time-skipping Temporal server, a worker,
and databases (a SQLite file and a private PostgreSQL server)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiohttp import web
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from callback_receiver import CallbackReceiver
from carriers.dev_secrets import generate_dev_secrets
from carriers.loader import default_registry
from models.interactions import InteractionStore
from settings import Settings, venv_binary
from simulators.core import SimulatorCore
from simulators.game_backend import GameBackend, start_game_backend
from simulators.server import sim_carriers, smsc_tariffs, start_simulator
from simulators.smsc import Smsc
from starter import SubscriptionClient
from tests.postgres import free_port, private_postgres
from worker import WorkerGroup, build_worker, make_adapter_pool, prepare_database
from workflows import search_attributes as sa

GAME_BACKEND_TOKEN = "test-game-backend-token"


@pytest.fixture(scope="session")
def carrier_secrets() -> dict[str, str]:
    return generate_dev_secrets(default_registry())


class SimulatorControl:
    """What tests ask of the simulators' control API; ``control`` says how it is reached."""

    async def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError

    async def set_balance(self, carrier: str, msisdn: str, balance: str) -> None:
        await self.control("accounts", {"carrier": carrier, "msisdn": msisdn, "balance": balance})

    async def fault(self, carrier: str, kind: str, msisdn: str | None = None, count: int = 1,
                    delay_seconds: float = 0) -> None:
        await self.control("faults", {"carrier": carrier, "kind": kind, "msisdn": msisdn,
                                      "count": count, "delay_seconds": delay_seconds})

    async def transactions(self, carrier: str, msisdn: str) -> list[dict[str, Any]]:
        books = await self.control(f"books?carrier={carrier}")
        return [t for t in books[carrier]["transactions"] if t["msisdn"] == msisdn]

    async def balance(self, carrier: str, msisdn: str) -> Decimal:
        books = await self.control(f"books?carrier={carrier}")
        return Decimal(books[carrier]["accounts"][msisdn])


@dataclass
class Simulator(SimulatorControl):
    core: SimulatorCore
    url: str
    smpp_endpoint: str

    async def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        async with httpx.AsyncClient(base_url=self.url) as client:
            if body is None:
                response = await client.get(f"/_control/{path}")
            else:
                response = await client.post(f"/_control/{path}", json=body)
            response.raise_for_status()
            return response.json()


@pytest.fixture(scope="session")
async def simulator(carrier_secrets: dict[str, str]) -> AsyncIterator[Simulator]:
    """The HTTP carriers and the SMSC, sharing one set of books."""
    registry = default_registry()
    core = SimulatorCore(sim_carriers(registry, carrier_secrets), Decimal("1000"))
    smsc = Smsc(core, smsc_tariffs(registry))
    runner, port = await start_simulator(core, smsc=smsc)
    smpp_port = await smsc.start()
    yield Simulator(core, f"http://127.0.0.1:{port}", f"127.0.0.1:{smpp_port}")
    await smsc.stop()
    await runner.cleanup()


@dataclass
class GameBackendServer:
    backend: GameBackend
    url: str

    async def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        async with httpx.AsyncClient(base_url=self.url) as client:
            response = (await client.get(f"/_control/{path}") if body is None
                        else await client.post(f"/_control/{path}", json=body))
            response.raise_for_status()
            return response.json()


@pytest.fixture(scope="session")
async def game_backend() -> AsyncIterator[GameBackendServer]:
    """The game backend that grants what a payment bought, on its own socket."""
    backend = GameBackend(GAME_BACKEND_TOKEN)
    runner, port = await start_game_backend(backend)
    yield GameBackendServer(backend, f"http://127.0.0.1:{port}")
    await runner.cleanup()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'billing.db'}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with private_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def settings(sqlite_url: str, simulator: Simulator, carrier_secrets: dict[str, str],
             game_backend: GameBackendServer) -> Settings:
    callback_port = free_port()
    return Settings(
        game_backend_url=game_backend.url,
        # the platform's notices (opt-in codes, receipts) to numbers of carriers without an SMSC
        # (an SMPP account no other test binds: the SMSC lets an account hold several binds,
        # and the settlement tests count on being gb-mersey's and bh-dilmun's only ones)
        notice_carrier_id="ng-lagoon",
        game_backend_token=SecretStr(GAME_BACKEND_TOKEN),
        database_url=sqlite_url,
        task_queue=f"test-{uuid.uuid4()}",
        callback_base_url=f"http://127.0.0.1:{callback_port}",
        callback_port=callback_port,
        simulator_urls={"sim": simulator.url, "smpp": simulator.smpp_endpoint},
        carrier_secrets={k: SecretStr(v) for k, v in carrier_secrets.items()},
        carrier_timeout_seconds=1.0,
        _env_file=None,
    )


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = prepare_database(settings, default_registry())
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_binary("temporal-test-server")
    )
    # an upsert of an unregistered attribute would fail the workflow task and stall time
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={k.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for k in sa.ALL},
        )
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def worker(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine
) -> AsyncIterator[WorkerGroup]:
    adapters = make_adapter_pool(default_registry(), settings, engine, temporal_env.client)
    async with build_worker(temporal_env.client, settings, engine, adapters) as running:
        yield running
    await adapters.aclose()


@pytest.fixture(scope="session", autouse=True)
async def callback_receiver(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine
) -> AsyncIterator[CallbackReceiver]:
    """The real receiver on the port the adapters give carriers as their callback URL."""
    receiver = CallbackReceiver(temporal_env.client, default_registry(), settings,
                                InteractionStore(engine, lane="callbacks").record, engine)
    runner = web.AppRunner(receiver.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.callback_port).start()
    yield receiver
    await runner.cleanup()


@pytest.fixture(scope="session")
def client(temporal_env: WorkflowEnvironment, worker: WorkerGroup, engine: Engine,
           settings: Settings) -> SubscriptionClient:
    return SubscriptionClient(temporal_env.client, engine, default_registry(), settings.task_queue,
                              settings.deployment_id)


@pytest.fixture(scope="session")
def temporal_client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


_numbers = iter(range(1_000_000, 9_999_999))


@pytest.fixture
def fr_msisdn() -> str:
    """A fresh, valid French mobile number on carrier fr-azur (+3361...)."""
    return f"+3361{next(_numbers):07d}"
