"""The generated catalogue: its size, fast and idempotent seeding, the 0004 migration over old
variants, and the variant selection's fallbacks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from carriers.loader import default_registry
from catalogue import VariantNotFound, generate_variants, load_catalog, select_variant
from models.db import MIGRATIONS_DIR, make_engine, migrate
from models.seed import seed_reference_data
from models.tables import PricePoint, ProductVariant


def _fresh(path: Path) -> tuple[str, Engine]:
    url = f"sqlite:///{path / 'catalogue.db'}"
    migrate(url)
    return url, make_engine(url)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    _, engine = _fresh(tmp_path_factory.mktemp("catalogue"))
    seed_reference_data(engine, default_registry())
    yield engine
    engine.dispose()


def test_the_catalogue_ships_thousands_of_variants_seeded_in_well_under_seconds(
        tmp_path: Path) -> None:
    _, engine = _fresh(tmp_path)
    started = time.perf_counter()
    seed_reference_data(engine, default_registry())
    elapsed = time.perf_counter() - started
    with Session(engine) as session:
        count = session.exec(select(func.count()).select_from(ProductVariant)).one()
        skus = session.exec(select(func.count(sa.distinct(col(ProductVariant.sku))))).one()
    engine.dispose()
    assert 3_000 <= count <= 10_000
    assert skus == count
    assert count == len(generate_variants(load_catalog(), default_registry()))
    assert elapsed < 3.0, f"seeding took {elapsed:.2f} s"


def test_seeding_again_writes_no_variant(seeded: Engine) -> None:
    writes: list[str] = []

    def spy(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "productvariant" in statement.lower() and not statement.lstrip().upper().startswith(
                "SELECT"):
            writes.append(statement)

    with Session(seeded) as session:
        before = session.exec(select(ProductVariant).order_by(ProductVariant.id)).all()
        before_rows = [v.model_dump() for v in before]
    sa.event.listen(seeded, "before_cursor_execute", spy)
    try:
        seed_reference_data(seeded, default_registry())
    finally:
        sa.event.remove(seeded, "before_cursor_execute", spy)
    with Session(seeded) as session:
        after = [v.model_dump() for v in
                 session.exec(select(ProductVariant).order_by(ProductVariant.id)).all()]
    assert writes == []
    assert after == before_rows


def test_every_price_point_variant_belongs_to_its_carriers_country(seeded: Engine) -> None:
    registry = default_registry()
    with Session(seeded) as session:
        rows = session.exec(
            select(ProductVariant, PricePoint).join(
                PricePoint, col(PricePoint.id) == col(ProductVariant.price_point_id))).all()
    assert rows
    for variant, price in rows:
        assert variant.country_code == registry.carrier_country[price.carrier_id]
        assert variant.product_id == price.product_id
        assert variant.locale is not None and variant.locale.endswith(f"_{variant.country_code}")


def test_migration_0004_keeps_the_variants_seeded_before_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0003")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO product (id, name) VALUES ('game-pass', 'Game Pass')"))
        conn.execute(sa.text("INSERT INTO productvariant (id, product_id, name, sku) VALUES "
                             "('game-pass-plus', 'game-pass', 'Plus', 'GP-PLUS')"))
    command.upgrade(config, "head")
    with Session(engine) as session:
        old = session.get(ProductVariant, "game-pass-plus")
        assert old is not None and old.edition == "plus" and not old.is_default
    seed_reference_data(engine, default_registry())
    with Session(engine) as session:
        old = session.get(ProductVariant, "game-pass-plus")
        assert old is not None and old.sku == "GP-PLUS" and old.country_code is None
        assert select_variant(session, "game-pass", None, None, None, edition="plus").id == old.id
    engine.dispose()


# -- selection -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("country", "locale", "price_point", "edition", "expected"),
    [
        # 1. exact
        ("FR", "fr_FR", "fr-azur-pass-monthly", None, "game-pass-standard-fr_FR-fr-azur-pass-monthly"),
        ("FR", "en_FR", "fr-azur-pass-weekly", "plus", "game-pass-plus-en_FR-fr-azur-pass-weekly"),
        # 2. same country: the locale with any price point (no price point given)
        ("FR", "fr_FR", None, None, "game-pass-standard-fr_FR-any"),
        # ... a price point not sold in this country: never another price point's variant
        ("FR", "fr_FR", "de-alpen-pass-monthly", None, "game-pass-standard-fr_FR-any"),
        # ... a locale we do not ship, in a language we do: that language in the country
        ("FR", "fr-CA", "fr-azur-pass-monthly", None, "game-pass-standard-fr_FR-fr-azur-pass-monthly"),
        # ... a language we do not ship: the country's default locale
        ("DE", "nl_NL", "de-alpen-pass-monthly", None, "game-pass-standard-de_DE-de-alpen-pass-monthly"),
        ("DE", None, None, None, "game-pass-standard-de_DE-any"),
        # 3. a country we do not sell in: the language with no country
        ("US", "es_US", None, None, "game-pass-standard-es"),
        # 4. nothing matches: the edition's global default
        ("US", "nl_NL", None, None, "game-pass-standard"),
        ("US", "nl_NL", None, "lite", "game-pass-lite"),
        (None, None, None, None, "game-pass-standard"),
    ],
)
def test_selection_falls_back_in_the_documented_order(
        seeded: Engine, country: str | None, locale: str | None, price_point: str | None,
        edition: str | None, expected: str) -> None:
    with Session(seeded) as session:
        assert select_variant(session, "game-pass", country, locale, price_point, edition).id == expected


def test_a_quantity_product_selects_its_default_edition(seeded: Engine) -> None:
    with Session(seeded) as session:
        variant = select_variant(session, "gem-pack", "GB", "en_GB", "gb-thames-gems-demo")
    assert variant.id == "gem-pack-100-en_GB-gb-thames-gems-demo"
    assert variant.quantity == 100


def test_a_product_or_edition_without_variants_is_a_clear_error(seeded: Engine) -> None:
    with Session(seeded) as session:
        with pytest.raises(VariantNotFound, match="no-such-product"):
            select_variant(session, "no-such-product", "FR", "fr_FR", None)
        with pytest.raises(VariantNotFound, match="platinum"):
            select_variant(session, "game-pass", "FR", "fr_FR", None, edition="platinum")
