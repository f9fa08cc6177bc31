"""The carrier registry is validated at start-up with errors naming the file and field."""

from pathlib import Path

import pytest

from carriers.loader import RegistryError, default_registry, load_registry

GOOD = """
[country]
code = "FR"
name = "France"
currency = "EUR"
timezones = ["Europe/Paris"]
default_locale = "fr_FR"

[[carriers]]
id = "fr-test"
name = "Test"
protocol = "oneapi"
base_url = "{sim}/fr-test"
auth = { kind = "basic", username = "u", secret_ref = "fr-test" }
timezone = "Europe/Paris"
locale = "fr_FR"
number_prefixes = ["+3361"]
price_points = [{ id = "p1", product = "game-pass", amount = "4.99", period = "monthly" }]
"""


def write(tmp_path: Path, text: str, name: str = "fr.toml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path


def test_shipped_registry_loads_and_routes() -> None:
    registry = default_registry()
    assert registry.route("+33612345678").id == "fr-azur"  # type: ignore[union-attr]
    assert registry.route("+4915112345678").id == "de-rheinfunk"  # type: ignore[union-attr]
    assert registry.route("+15417543010") is None
    assert registry.currency_of("kw-gulfcell") == "KWD"


@pytest.mark.parametrize(("change", "message"), [
    (('amount = "4.99"', 'amount = "4.999"'), r"fr.toml: carriers.0.price_points.0.amount"),
    (('amount = "4.99"', 'amount = "-1"'), r"fr.toml: carriers.0.price_points.0.amount"),
    (('protocol = "oneapi"', 'protocol = "carrier-pigeon"'), r"fr.toml: carriers.0.protocol"),
    (('timezone = "Europe/Paris"', 'timezone = "Mars/Olympus"'), r"fr.toml: carriers.0.timezone"),
    (('currency = "EUR"', 'currency = "XXX"'), r"fr.toml: country.currency"),
    (('"+3361"', '"3361"'), r"fr.toml: carriers.0.number_prefixes"),
    (('period = "monthly"', 'period = "interval"'), r"interval_seconds is required"),
    (('locale = "fr_FR"', 'locale = "fr_FR"\npassword = "hunter2"'), r"carriers.0.password"),
])
def test_invalid_entries_name_file_and_field(tmp_path: Path, change: tuple[str, str],
                                             message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        load_registry(write(tmp_path, GOOD.replace(*change)))


def test_duplicate_carriers_are_refused(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    write(tmp_path, GOOD.replace('code = "FR"', 'code = "BE"').replace('"p1"', '"p2"'), "be.toml")
    with pytest.raises(RegistryError, match="'fr-test' is defined twice"):
        load_registry(tmp_path)
