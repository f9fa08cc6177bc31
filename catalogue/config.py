"""The shape of ``models/catalog.toml``: products, their editions, and the content languages."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CATALOG_FILE = Path(__file__).resolve().parent.parent / "models" / "catalog.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EditionConfig(_Strict):
    id: str = Field(pattern=r"^[a-z0-9]+$")
    name: str
    # the sku of the edition's global default variant
    sku: str
    # units a quantity product grants
    quantity: int | None = Field(default=None, gt=0)


class ProductConfig(_Strict):
    id: str
    name: str
    sku_prefix: str = Field(pattern=r"^[A-Z0-9]+$")
    grant: Literal["time", "quantity"]
    default_edition: str
    editions: list[EditionConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ProductConfig:
        ids = [e.id for e in self.editions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.id}: editions repeat an id")
        if self.default_edition not in ids:
            raise ValueError(f"{self.id}: default edition {self.default_edition!r} is not an edition")
        for edition in self.editions:
            # a quantity product must say how many; a time product grants a period, not units
            if (edition.quantity is None) == (self.grant == "quantity"):
                raise ValueError(f"{self.id}/{edition.id}: quantity does not fit grant={self.grant}")
        return self


class Catalog(_Strict):
    languages: list[str] = Field(min_length=1)
    products: list[ProductConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _languages(self) -> Catalog:
        for language in self.languages:
            if len(language) != 2 or not language.islower():
                raise ValueError(f"language {language!r} is not an ISO 639-1 code")
        return self


def load_catalog(path: Path = CATALOG_FILE) -> Catalog:
    return Catalog.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
