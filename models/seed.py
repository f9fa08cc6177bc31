"""Writes the reference data (countries, carriers, products, price points) from the registry."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Engine
from sqlmodel import Session

from carriers.loader import Registry
from models.tables import Carrier, Country, PricePoint, Product, ProductVariant

CATALOG_FILE = Path(__file__).resolve().parent / "catalog.toml"


class VariantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    name: str
    sku: str


class ProductConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    name: str
    variants: list[VariantConfig]


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")
    products: list[ProductConfig]


def load_catalog(path: Path = CATALOG_FILE) -> Catalog:
    return Catalog.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))


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
            for variant in product.variants:
                session.merge(
                    ProductVariant(
                        id=variant.id, product_id=product.id, name=variant.name, sku=variant.sku
                    )
                )
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
        session.commit()
