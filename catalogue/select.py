"""Which variant a subscriber receives.

Fallback order, first match wins (``edition`` defaults to the product's default edition):

1. exact: the subscriber's country, locale and price point;
2. same country, any locale: the locale itself, then a locale of the same language, then the
   country's default locale, then any other (alphabetically); at each step the price point's
   own variant before the country's "any price point" one. Variants made for another price
   point are never chosen;
3. language match, for a country we have no variants for: the edition's variant in the
   subscriber's language with no country;
4. product default: the edition's global variant, then the product's default variant.
"""

from __future__ import annotations

from sqlalchemy import or_
from sqlmodel import Session, col, select

from models.tables import Country, ProductVariant


class VariantNotFound(LookupError):
    """The product (or the edition asked for) has no variant at all: a catalogue mistake."""


def _language(locale: str | None) -> str | None:
    return locale.replace("-", "_").split("_", 1)[0].lower() if locale else None


def _default_variant(session: Session, product_id: str) -> ProductVariant:
    default = session.exec(select(ProductVariant).where(
        ProductVariant.product_id == product_id, col(ProductVariant.is_default))).first()
    if default is None:
        raise VariantNotFound(f"product {product_id!r} has no variants (no default variant)")
    return default


def select_variant(session: Session, product_id: str, country_code: str | None,
                   locale: str | None, price_point_id: str | None,
                   edition: str | None = None) -> ProductVariant:
    """The variant to deliver; raises ``VariantNotFound`` if the product (or edition) has none."""
    product_default = _default_variant(session, product_id)
    edition = edition or product_default.edition
    locale = locale.replace("-", "_") if locale else None
    language = _language(locale)
    candidates = session.exec(select(ProductVariant).where(
        ProductVariant.product_id == product_id, ProductVariant.edition == edition,
        or_(col(ProductVariant.country_code).is_(None),
            col(ProductVariant.country_code) == country_code))).all()
    if not candidates:
        raise VariantNotFound(f"product {product_id!r} has no variants in edition {edition!r}")

    in_country = [v for v in candidates if v.country_code is not None
                  and v.price_point_id in (None, price_point_id)]
    if in_country:
        country = session.get(Country, country_code) if country_code else None
        default_locale = country.default_locale if country else None

        def rank(variant: ProductVariant) -> tuple[int, int, str]:
            if variant.locale == locale:
                by_locale = 0
            elif _language(variant.locale) == language:
                by_locale = 1
            elif variant.locale == default_locale:
                by_locale = 2
            else:
                by_locale = 3
            by_price = 0 if price_point_id and variant.price_point_id == price_point_id else 1
            return by_locale, by_price, variant.locale or ""

        return min(in_country, key=rank)

    global_ones = [v for v in candidates if v.country_code is None]
    for variant in global_ones:
        if variant.locale is not None and variant.locale == language:
            return variant
    for variant in global_ones:
        if variant.locale is None:
            return variant
    return product_default
