"""Writes the reference data (countries, carriers, products, price points) from the registry,
and the catalogue's variants generated from ``models/catalog.toml``."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from carriers.loader import Registry
from catalogue.config import CATALOG_FILE, Catalog, load_catalog
from catalogue.generate import generate_variants
from models.tables import Carrier, Country, PricePoint, Product, ProductVariant

__all__ = ["CATALOG_FILE", "Catalog", "load_catalog", "seed_reference_data"]


def _seed_variants(session: Session, rows: list[dict[str, Any]]) -> None:
    """Thousands of rows: inserted and updated in bulk, and only those that differ, so seeding
    at every start stays fast and a second run writes nothing. Variants no longer generated
    stay (deliveries refer to them)."""
    table = sa.inspect(ProductVariant).local_table
    existing = {row["id"]: dict(row) for row in session.execute(sa.select(table)).mappings()}
    new = [r for r in rows if r["id"] not in existing]
    changed = [r for r in rows if r["id"] in existing and existing[r["id"]] != r]
    if changed:
        session.execute(sa.update(ProductVariant), changed)
    if new:
        session.execute(sa.insert(ProductVariant), new)


def seed_reference_data(engine: Engine, registry: Registry, catalog: Catalog | None = None) -> None:
    """Upserts by primary key, so it is safe to run at every start."""
    catalog = catalog or load_catalog()
    product_ids = {p.id for p in catalog.products}
    with Session(engine) as session:
        for country in registry.countries.values():
            session.merge(
                Country(
                    code=country.code,
                    name=country.name,
                    currency=country.currency,
                    timezones=",".join(country.timezones),
                    default_locale=country.default_locale,
                )
            )
        for product in catalog.products:
            session.merge(Product(id=product.id, name=product.name))
        session.flush()
        for carrier in registry.carriers.values():
            currency = registry.currency_of(carrier.id)
            session.merge(
                Carrier(
                    id=carrier.id,
                    name=carrier.name,
                    country_code=registry.carrier_country[carrier.id],
                    protocol=carrier.protocol,
                    base_url=carrier.base_url,
                    auth_kind=carrier.auth.kind,
                    currency=currency,
                    timezone=carrier.timezone,
                )
            )
            session.flush()
            for price in carrier.price_points:
                if price.product not in product_ids:
                    raise ValueError(
                        f"price point {price.id} of {carrier.id} names unknown product {price.product!r}"
                    )
                session.merge(
                    PricePoint(
                        id=price.id,
                        product_id=price.product,
                        carrier_id=carrier.id,
                        amount_minor=registry.amount_minor(carrier.id, price),
                        currency=currency,
                        period=price.period,
                        interval_seconds=price.interval_seconds,
                        retry_schedule_seconds=",".join(str(d) for d in price.retry_schedule_seconds),
                    )
                )
        # variants refer to countries and price points: written after them
        session.flush()
        _seed_variants(session, generate_variants(catalog, registry))
        session.commit()
