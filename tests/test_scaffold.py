"""The scaffold writes a registry entry and an adapter module that load and build."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

import pytest

from carriers.loader import REGISTRY_DIR, RegistryError, load_registry
from carriers.scaffold import main as scaffold_main
from carriers.scaffold import scaffold


def args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "name": "Atlas Télécom", "protocol": "rest", "country": "MA", "prefix": ["+2126"],
        "country_name": "Morocco", "currency": "EUR", "timezone": "Africa/Casablanca",
        "locale": "fr_MA", "price": "4.99", "demo_price": "0.99"}
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    registry = tmp_path / "registry"
    shutil.copytree(REGISTRY_DIR, registry)
    custom = tmp_path / "custom"
    custom.mkdir()
    return registry, custom


@pytest.mark.parametrize(("protocol", "family"), [
    ("rest", "OneApiAdapter"), ("soap", "ParlayXAdapter"), ("smpp", "SmppAdapter")])
def test_scaffolded_carrier_validates_and_its_adapter_subclasses_the_family(
    dirs: tuple[Path, Path], protocol: str, family: str
) -> None:
    registry_dir, custom_dir = dirs
    carrier_id, written = scaffold(args(protocol=protocol), registry_dir, custom_dir)
    assert carrier_id == "ma-atlas-telecom"
    registry = load_registry(registry_dir)
    carrier = registry.carriers[carrier_id]
    assert carrier.protocol == {"rest": "oneapi", "soap": "parlayx", "smpp": "smpp"}[protocol]
    assert registry.route("+212612345678") is carrier
    spec = importlib.util.spec_from_file_location("scaffolded", written[1])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    adapter_class = module.MaAtlasTelecomAdapter
    assert [c.__name__ for c in adapter_class.__mro__][1] == family


def test_an_existing_country_file_is_extended(dirs: tuple[Path, Path]) -> None:
    registry_dir, custom_dir = dirs
    before = (registry_dir / "fr.toml").read_text()
    scaffold(args(country="FR", prefix=["+33700"], country_name=None, currency=None),
             registry_dir, custom_dir)
    assert (registry_dir / "fr.toml").read_text().startswith(before)
    assert "fr-atlas-telecom" in load_registry(registry_dir).carriers


def test_an_invalid_entry_leaves_nothing_behind(dirs: tuple[Path, Path]) -> None:
    registry_dir, custom_dir = dirs
    before = (registry_dir / "fr.toml").read_text()
    with pytest.raises(RegistryError, match="number_prefixes"):
        scaffold(args(country="FR", prefix=["33700"]), registry_dir, custom_dir)
    assert (registry_dir / "fr.toml").read_text() == before
    assert list(custom_dir.iterdir()) == []


def test_a_duplicate_is_refused(dirs: tuple[Path, Path]) -> None:
    registry_dir, custom_dir = dirs
    scaffold(args(), registry_dir, custom_dir)
    with pytest.raises(SystemExit, match="already exists"):
        scaffold(args(), registry_dir, custom_dir)


def test_the_command_line_needs_a_protocol() -> None:
    with pytest.raises(SystemExit):
        scaffold_main(["Nameless", "--country", "FR", "--prefix", "+3370"])
