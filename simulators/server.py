"""All HTTP carrier simulators in one real server on 127.0.0.1, each carrier under /{carrier}/.

    python -m simulators.server --port 8701 [--chaos-rate 0.05] [--default-balance 100]
                                [--state-dir DIR]

With --state-dir the carriers keep their books (and each family's records) in a SQLite file
there and find them again after a restart; without it they forget everything when stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from aiohttp import web

from carriers.loader import Registry, default_registry
from simulators.callback_aggregator import CallbackAggregator
from simulators.camara import CamaraOperator
from simulators.core import SimCarrier, SimulatorCore
from simulators.oneapi import OneApiCarrier
from simulators.parlayx import ParlayXCarrier
from simulators.polling_aggregator import PollingAggregator
from simulators.settlement_reports import SettlementReports
from simulators.smsc import Smsc


class Family(Protocol):
    def add_routes(self, app: web.Application) -> None: ...


FAMILIES: dict[str, Callable[[SimulatorCore], Family]] = {
    "camara": CamaraOperator,
    "polling-aggregator": PollingAggregator,
    "callback-aggregator": CallbackAggregator,
}


# the families whose carriers' own data (paths, password types, fault codes) shapes the answers
DATA_FAMILIES: list[Callable[[SimulatorCore, Registry | None], Family]] = [
    OneApiCarrier, ParlayXCarrier]


def sim_carriers(registry: Registry, carrier_secrets: dict[str, str]) -> dict[str, SimCarrier]:
    carriers = {}
    for c in registry.carriers.values():
        options = set(c.quirks) | ({"quirky_echo"} if c.request_format == "form" else set())
        carriers[c.id] = SimCarrier(
            c.id, c.protocol, registry.currency_of(c.id), c.auth.username,
            carrier_secrets.get(c.auth.secret_ref, ""), c.auth.kind, frozenset(options),
            carrier_secrets.get(c.auth.callback_secret_ref or "", ""),
            c.promises.deduplicates_by_key, c.promises.status_lookup)
    return carriers


def smsc_tariffs(registry: Registry) -> dict[str, dict[str, Decimal]]:
    """What each premium short code costs, per SMPP carrier."""
    return {c.id: {p.short_code: p.amount for p in c.price_points if p.short_code}
            for c in registry.carriers.values() if c.protocol == "smpp"}


def build_app(core: SimulatorCore, registry: Registry | None = None,
              smsc: Smsc | None = None) -> web.Application:
    """Every HTTP family's carriers; the families that read carrier data (service paths,
    password types, fault codes) read it from ``registry`` (default: ours). With ``smsc``, its
    control endpoints too (texts from subscribers, the SMS a phone received)."""
    app = web.Application()
    core.add_routes(app)
    if smsc is not None:
        smsc.add_routes(app)
    for family in FAMILIES.values():
        family(core).add_routes(app)
    for data_family in DATA_FAMILIES:
        data_family(core, registry).add_routes(app)
    SettlementReports(core).add_routes(app)
    return app


async def start_simulator(core: SimulatorCore, host: str = "127.0.0.1",
                          port: int = 0, registry: Registry | None = None,
                          smsc: Smsc | None = None) -> tuple[web.AppRunner, int]:
    """Starts the server in the running loop; returns the runner and the port bound."""
    runner = web.AppRunner(build_app(core, registry, smsc), access_log=None,
                           handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = runner.addresses
    return runner, int(sockets[0][1])


def main() -> None:
    from settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--smpp-port", type=int, default=2775)
    parser.add_argument("--default-balance", default="100")
    parser.add_argument("--chaos-rate", type=float, default=0.0,
                        help="share of requests that meet a random fault")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="keep the books in a SQLite file in this directory across restarts")
    args = parser.parse_args()
    settings = get_settings()
    secrets = {k: v.get_secret_value() for k, v in settings.carrier_secrets.items()}
    registry = default_registry()
    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    core = SimulatorCore(sim_carriers(registry, secrets), Decimal(args.default_balance),
                         args.chaos_rate, state_path=args.state_dir)
    asyncio.run(serve(core, Smsc(core, smsc_tariffs(registry)), args.host, args.port,
                      args.smpp_port))


async def serve(core: SimulatorCore, smsc: Smsc, host: str, port: int, smpp_port: int) -> None:
    runner, _ = await start_simulator(core, host, port, smsc=smsc)
    await smsc.start(host, smpp_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await smsc.stop()
    await runner.cleanup()
    core.close()


if __name__ == "__main__":
    main()
