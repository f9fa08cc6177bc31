"""The product catalogue: variants generated from compact data, and the choice of the variant
a subscriber receives."""

from catalogue.config import Catalog, load_catalog
from catalogue.generate import generate_variants
from catalogue.select import VariantNotFound, select_variant

__all__ = ["Catalog", "VariantNotFound", "generate_variants", "load_catalog", "select_variant"]
