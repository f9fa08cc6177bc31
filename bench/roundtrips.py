"""Database round trips per charge, counted rather than timed: SQL statements and commits the
``charge_subscription`` activity makes for one successful charge, through the real activity
(run by ``temporalio.testing.ActivityEnvironment``) against the real carrier simulator on an
ephemeral port, on a fresh SQLite file.

    .venv/bin/python -m bench.roundtrips [--carrier fr-azur] [--rules] [--verbose]

Two charges are counted: the first of a subscription this process has not charged before
(the headline figure) and the next cycle of the same subscription. A warm-up charge of another
subscription comes first, so reference data read once per process (a carrier's country) is
already in hand, as in a running worker.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.testing import ActivityEnvironment

from activities.billing import BillingActivities
from activities.messages import ChargeInput, ChargeOutput, charge_key, key_prefix
from carriers.dev_secrets import generate_dev_secrets
from carriers.loader import Registry, default_registry
from carriers.numbers import sample_msisdn
from carriers.pool import AdapterPool
from models.db import make_engine, migrate
from models.interactions import InteractionStore
from models.seed import seed_reference_data
from models.tables import PricePoint, Subscriber, Subscription
from rules.resolve import resolve_rules
from rules.types import ChargingRules
from settings import Settings
from simulators.core import SimulatorCore
from simulators.server import sim_carriers, start_simulator

DEPLOYMENT = "rt"


@dataclass
class Counts:
    """What one stretch of work asked of the database."""

    statements: int = 0
    commits: int = 0
    checkouts: int = 0
    texts: list[str] = field(default_factory=list)


class RoundTripCounter:
    """Counts statements sent (``before_cursor_execute``), commits and pool checkouts (one a
    session that touched the database) on ``engine`` while ``counting()`` is open."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._current: Counts | None = None

    def _statement(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if self._current is not None:
            self._current.statements += 1
            self._current.texts.append(" ".join(statement.split())[:160])

    def _commit(self, _conn: Any) -> None:
        if self._current is not None:
            self._current.commits += 1
            self._current.texts.append("COMMIT")

    def _checkout(self, *_args: Any) -> None:
        if self._current is not None:
            self._current.checkouts += 1

    @contextmanager
    def counting(self) -> Iterator[Counts]:
        counts = Counts()
        sa.event.listen(self._engine, "before_cursor_execute", self._statement)
        sa.event.listen(self._engine, "commit", self._commit)
        sa.event.listen(self._engine.pool, "checkout", self._checkout)
        self._current = counts
        try:
            yield counts
        finally:
            self._current = None
            sa.event.remove(self._engine, "before_cursor_execute", self._statement)
            sa.event.remove(self._engine, "commit", self._commit)
            sa.event.remove(self._engine.pool, "checkout", self._checkout)


@dataclass
class Bench:
    engine: Engine
    activities: BillingActivities
    registry: Registry
    carrier_id: str
    rules: bool
    rng: random.Random = field(default_factory=lambda: random.Random(2026))
    taken: set[str] = field(default_factory=set)

    def subscribe(self) -> tuple[int, int, str, PricePoint]:
        """A subscriber and an active subscription as rows (no workflow: only the activity
        is run here). Returns (subscriber id, subscription id, key token, price point)."""
        carrier = self.registry.carriers[self.carrier_id]
        msisdn = sample_msisdn(carrier, self.registry, self.rng, self.taken)
        with Session(self.engine, expire_on_commit=False) as session:
            price = next(p for p in session.exec(sa.select(PricePoint).where(  # type: ignore[call-overload]
                PricePoint.carrier_id == self.carrier_id,  # type: ignore[arg-type]
                PricePoint.period == "monthly")).scalars())  # type: ignore[arg-type]
            subscriber = Subscriber(msisdn=msisdn, carrier_id=self.carrier_id,
                                    timezone=carrier.timezone, locale="en_GB")
            session.add(subscriber)
            session.flush()
            assert subscriber.id is not None
            subscription = Subscription(subscriber_id=subscriber.id, product_id=price.product_id,
                                        price_point_id=price.id)
            session.add(subscription)
            session.commit()
            assert subscription.id is not None
            return subscriber.id, subscription.id, subscription.key_token, price

    def charge_input(self, subscriber_id: int, subscription_id: int, token: str,
                     price: PricePoint, cycle: int) -> ChargeInput:
        rules: ChargingRules | None = None
        if self.rules:
            carrier = self.registry.carriers[self.carrier_id]
            rules = resolve_rules(self.registry.carrier_country[self.carrier_id],
                                  self.carrier_id, price.product_id, price.amount_minor,
                                  str(price.period), carrier.timezone)
        return ChargeInput(
            subscription_id=subscription_id, subscriber_id=subscriber_id,
            carrier_id=self.carrier_id, cycle=cycle, attempt_slot=0,
            idempotency_key=charge_key(key_prefix(DEPLOYMENT, token), cycle, 0),
            amount_minor=price.amount_minor, currency=price.currency,
            due_at=datetime.now(UTC), description="round trips", rules=rules)

    async def charge(self, charge: ChargeInput) -> ChargeOutput:
        return await ActivityEnvironment().run(self.activities.charge_subscription, charge)


@asynccontextmanager
async def bench(carrier_id: str, rules: bool, directory: Path) -> AsyncIterator[Bench]:
    """A simulator on an ephemeral port, a migrated and seeded SQLite file, the activities."""
    registry = default_registry()
    secrets = generate_dev_secrets(registry)
    core = SimulatorCore(sim_carriers(registry, secrets), Decimal("1000"))
    runner, port = await start_simulator(core)
    url = f"sqlite:///{directory / 'roundtrips.db'}"
    settings = Settings(
        database_url=url, deployment_id=DEPLOYMENT, task_queue=f"rt-{uuid.uuid4()}",
        simulator_urls={"sim": f"http://127.0.0.1:{port}", "smpp": "127.0.0.1:9"},
        carrier_secrets={k: SecretStr(v) for k, v in secrets.items()},
        carrier_timeout_seconds=5.0, _env_file=None)
    engine = make_engine(url)
    migrate(url)
    seed_reference_data(engine, registry)
    adapters = AdapterPool(registry, settings, InteractionStore(engine).record)
    try:
        yield Bench(engine, BillingActivities(engine, adapters, registry, DEPLOYMENT),
                    registry, carrier_id, rules)
    finally:
        await adapters.aclose()
        engine.dispose()
        await runner.cleanup()


async def measure(carrier_id: str = "fr-azur", rules: bool = False
                  ) -> tuple[Counts, Counts]:
    """(first charge of a subscription new to this process, its next cycle), both succeeded."""
    with tempfile.TemporaryDirectory(prefix="roundtrips-") as tmp:
        async with bench(carrier_id, rules, Path(tmp)) as b:
            counter = RoundTripCounter(b.engine)
            warm = await asyncio.to_thread(b.subscribe)
            warmed = await b.charge(b.charge_input(*warm, cycle=1))
            assert warmed.outcome == "succeeded", warmed
            subscriber_id, subscription_id, token, price = await asyncio.to_thread(b.subscribe)
            results = []
            for cycle in (1, 2):
                charge = b.charge_input(subscriber_id, subscription_id, token, price, cycle)
                with counter.counting() as counts:
                    out = await b.charge(charge)
                assert out.outcome == "succeeded", out
                results.append(counts)
            return results[0], results[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--carrier", default="fr-azur")
    parser.add_argument("--rules", action="store_true",
                        help="charge under the carrier's rules (spend caps read first)")
    parser.add_argument("--verbose", action="store_true", help="list the statements")
    args = parser.parse_args(argv)
    first, again = asyncio.run(measure(args.carrier, args.rules))
    for name, counts in (("first charge of a subscription", first), ("next cycle", again)):
        if args.verbose:
            print(f"-- {name}", file=sys.stderr)
            for text in counts.texts:
                print(f"   {text}", file=sys.stderr)
        print(f"{name}: statements {counts.statements}, commits {counts.commits}, "
              f"sessions {counts.checkouts}")
    print(f"statements per charge: {first.statements}, commits per charge: {first.commits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
