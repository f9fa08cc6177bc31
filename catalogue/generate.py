"""Expands the catalogue's compact data into every variant, as plain rows for a bulk insert."""

from __future__ import annotations

from typing import Any

from carriers.loader import Registry
from catalogue.config import Catalog, EditionConfig, ProductConfig


def _row(product: ProductConfig, edition: EditionConfig, *, id: str, sku: str, name: str,
         country_code: str | None = None, locale: str | None = None,
         price_point_id: str | None = None, is_default: bool = False) -> dict[str, Any]:
    return {"id": id, "product_id": product.id, "name": name, "sku": sku,
            "edition": edition.id, "country_code": country_code, "locale": locale,
            "price_point_id": price_point_id, "quantity": edition.quantity,
            "is_default": is_default}


def _price_points(registry: Registry, product_id: str) -> dict[str, list[str]]:
    """Price point ids of ``product_id`` by country code, in registry order."""
    by_country: dict[str, list[str]] = {code: [] for code in registry.countries}
    for carrier in registry.carriers.values():
        country = registry.carrier_country[carrier.id]
        by_country[country] += [p.id for p in carrier.price_points if p.product == product_id]
    return by_country


def generate_variants(catalog: Catalog, registry: Registry) -> list[dict[str, Any]]:
    """Per product and edition: the global default (``<product>-<edition>``, the edition's own
    sku), one variant per language with no country, and per registry country one per language
    in that country's region, for each of the product's price points there and for any."""
    rows: list[dict[str, Any]] = []
    for product in catalog.products:
        price_points = _price_points(registry, product.id)
        for edition in product.editions:
            base_id = f"{product.id}-{edition.id}"
            base_sku = f"{product.sku_prefix}-{edition.id.upper()}"
            title = f"{product.name} {edition.name}"
            rows.append(_row(product, edition, id=base_id, sku=edition.sku, name=title,
                             is_default=edition.id == product.default_edition))
            for language in catalog.languages:
                rows.append(_row(product, edition, id=f"{base_id}-{language}",
                                 sku=f"{base_sku}-{language.upper()}", name=f"{title} ({language})",
                                 locale=language))
            for country, points in sorted(price_points.items()):
                for language in catalog.languages:
                    locale = f"{language}_{country}"
                    for point in [None, *points]:
                        suffix = point or "any"
                        rows.append(_row(
                            product, edition, id=f"{base_id}-{locale}-{suffix}",
                            sku=f"{base_sku}-{locale}-{suffix}".upper(),
                            name=f"{title} ({locale}, {suffix})", country_code=country,
                            locale=locale, price_point_id=point))
    skus = [r["sku"] for r in rows]
    if len(set(skus)) != len(skus):
        raise ValueError("the catalogue generates the same sku twice")
    return rows
