"""Idempotency keys are unique across databases, restores and environments (finding 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlmodel import Session

from activities.messages import charge_key, key_prefix, refund_key
from carriers.loader import default_registry
from models.db import make_engine, migrate
from models.seed import seed_reference_data
from models.tables import Subscriber, Subscription, new_key_token
from settings import Settings


def first_subscription_key(path: Path, deployment: str) -> tuple[int, str]:
    """A fresh database (a restore, another environment) and its first subscription's key."""
    url = f"sqlite:///{path}"
    migrate(url)
    engine = make_engine(url)
    seed_reference_data(engine, default_registry())
    with Session(engine) as session:
        subscriber = Subscriber(msisdn="+33612345678", carrier_id="fr-azur",
                                timezone="Europe/Paris", locale="fr_FR")
        session.add(subscriber)
        session.flush()
        assert subscriber.id is not None
        subscription = Subscription(subscriber_id=subscriber.id, product_id="game-pass",
                                    price_point_id="fr-azur-pass-monthly")
        session.add(subscription)
        session.commit()
        assert subscription.id is not None
        key = charge_key(key_prefix(deployment, subscription.key_token), 1, 0)
    engine.dispose()
    return subscription.id, key


def test_the_same_subscription_id_in_two_databases_never_gives_the_same_key(
    tmp_path: Path,
) -> None:
    first_id, first = first_subscription_key(tmp_path / "a.db", "prod")
    second_id, second = first_subscription_key(tmp_path / "b.db", "prod")
    assert first_id == second_id == 1
    assert first != second
    assert first.startswith("prod-") and first.endswith("-c1-a0")


def test_a_second_environment_is_named_in_every_key(tmp_path: Path) -> None:
    _, staging = first_subscription_key(tmp_path / "c.db", "staging")
    assert staging.startswith("staging-")
    assert refund_key(key_prefix("staging", "abc"), 3) == "staging-abc-r3"


def test_key_tokens_are_random_and_carrier_safe() -> None:
    tokens = {new_key_token() for _ in range(2000)}
    assert len(tokens) == 2000
    assert all(len(t) == 12 and t.isalnum() and t.islower() for t in tokens)


@pytest.mark.parametrize("bad", ["", "Prod", "prod-eu", "a" * 13, "pr od"])
def test_a_deployment_id_that_would_break_keys_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        Settings(deployment_id=bad, _env_file=None)
