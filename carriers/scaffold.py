"""Scaffolds a new carrier: a registry entry (and the country file if it is new) plus a small
adapter module subclassing its family's adapter. The conformance suite picks the carrier up
from the registry, so it is tested as soon as it exists.

    python -m carriers.scaffold "Tejo Móvel" --protocol rest --country PT --prefix +35191 \\
        --currency EUR --timezone Europe/Lisbon --locale pt_PT --country-name Portugal
"""

from __future__ import annotations

import argparse
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from carriers.loader import REGISTRY_DIR, RegistryError, load_registry

CUSTOM_DIR = Path(__file__).resolve().parent / "custom"
STANDARD_RECEIPT = (r"id:(?P<id>\S+) sub:\d+ dlvrd:\d+ submit date:\d+ done date:\d+ "
                    r"stat:(?P<stat>[A-Z]+) err:(?P<err>\d+)")


@dataclass(frozen=True)
class Family:
    protocol: str
    base_class: str
    module: str
    base_url: str
    auth: str
    extra: str = ""


FAMILIES = {
    "rest": Family("oneapi", "OneApiAdapter", "carriers.oneapi", "{{sim}}/{id}/payment/v1",
                   'auth = {{ kind = "basic", username = "games-{id}", secret_ref = "{id}" }}'),
    "soap": Family("parlayx", "ParlayXAdapter", "carriers.parlayx", "{{sim}}/{id}/parlayx",
                   'auth = {{ kind = "wsse", username = "games-{id}", secret_ref = "{id}" }}'),
    "smpp": Family("smpp", "SmppAdapter", "carriers.smpp", "{{smpp}}",
                   'auth = {{ kind = "smpp-bind", username = "{short_id}", secret_ref = "{id}" }}',
                   'interaction = "callback"\nsmpp = { receipt_pattern = \'' + STANDARD_RECEIPT
                   + '\', insufficient_funds_errors = ["088"] }\n'),
}


def slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def class_name(carrier_id: str) -> str:
    return "".join(part.title() for part in carrier_id.split("-")) + "Adapter"


def render_adapter(carrier_id: str, name: str, family: Family) -> str:
    return f'''"""{name}: the {family.protocol} family's adapter, for this carrier's differences.

Override only what its gateway does differently (see docs/adding-a-carrier.md); transport,
authentication and the interaction records stay the family's.
"""

from {family.module} import {family.base_class}


class {class_name(carrier_id)}({family.base_class}):
    pass
'''


def render_entry(carrier_id: str, name: str, family: Family, prefixes: list[str], timezone: str,
                 locale: str, price: str, demo_price: str) -> str:
    short_codes = family.protocol == "smpp"
    codes = (', short_code = "90000"', ', short_code = "90001"') if short_codes else ("", "")
    period = "weekly" if short_codes else "monthly"
    adapter = f"carriers.custom.{carrier_id.replace('-', '_')}:{class_name(carrier_id)}"
    auth = family.auth.format(id=carrier_id, short_id=carrier_id.replace("-", "_")[:15])
    regular = (f'{{ id = "{carrier_id}-pass-{period}", product = "game-pass", '
               f'amount = "{price}", period = "{period}"{codes[0]} }}')
    demo = (f'{{ id = "{carrier_id}-pass-demo", product = "game-pass", amount = "{demo_price}", '
            f'period = "interval", interval_seconds = 10, retry_schedule_seconds = [3, 6]'
            f'{codes[1]} }}')
    return f'''
[[carriers]]
id = "{carrier_id}"
name = "{name}"
protocol = "{family.protocol}"
adapter = "{adapter}"
base_url = "{family.base_url.format(id=carrier_id)}"
{auth}
{family.extra}timezone = "{timezone}"
locale = "{locale}"
number_prefixes = [{", ".join(f'"{p}"' for p in prefixes)}]
price_points = [
  {regular},
  {demo},
]
'''


def render_country(code: str, name: str, currency: str, timezone: str, locale: str) -> str:
    return (f'[country]\ncode = "{code}"\nname = "{name}"\ncurrency = "{currency}"\n'
            f'timezones = ["{timezone}"]\ndefault_locale = "{locale}"\n')


def scaffold(args: argparse.Namespace, registry_dir: Path = REGISTRY_DIR,
             custom_dir: Path = CUSTOM_DIR) -> tuple[str, list[Path]]:
    """Writes the files; returns the carrier id and the paths written. Nothing is left behind
    if the registry does not validate afterwards."""
    family = FAMILIES[args.protocol]
    carrier_id = f"{args.country.lower()}-{slug(args.name)}"
    registry = load_registry(registry_dir)
    if carrier_id in registry.carriers:
        raise SystemExit(f"carrier {carrier_id} already exists")
    country_file = registry_dir / f"{args.country.lower()}.toml"
    existing = registry.countries.get(args.country.upper())
    if existing is None and not (args.currency and args.country_name):
        raise SystemExit(f"{args.country} is a new country: give --country-name and --currency")
    timezone = args.timezone or (existing.timezones[0] if existing else "UTC")
    locale = args.locale or (existing.default_locale if existing else "en")
    module = custom_dir / f"{carrier_id.replace('-', '_')}.py"
    before = country_file.read_text(encoding="utf-8") if country_file.exists() else None
    header = before if before is not None else render_country(
        args.country.upper(), args.country_name, args.currency, timezone, locale)
    entry = render_entry(carrier_id, args.name, family, args.prefix, timezone, locale,
                         args.price, args.demo_price)
    country_file.write_text(header + entry, encoding="utf-8")
    module.write_text(render_adapter(carrier_id, args.name, family), encoding="utf-8")
    try:
        load_registry(registry_dir)
    except RegistryError:
        module.unlink()
        if before is None:
            country_file.unlink()
        else:
            country_file.write_text(before, encoding="utf-8")
        raise
    return carrier_id, [country_file, module]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the carrier's name, e.g. 'Tejo Móvel'")
    parser.add_argument("--protocol", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--country", required=True, help="ISO 3166 alpha-2 code")
    parser.add_argument("--prefix", required=True, action="append",
                        help="a number range, e.g. +35191 (repeatable)")
    parser.add_argument("--country-name")
    parser.add_argument("--currency")
    parser.add_argument("--timezone")
    parser.add_argument("--locale")
    parser.add_argument("--price", default="4.99", help="the monthly (SMPP: weekly) price")
    parser.add_argument("--demo-price", default="0.99")
    args = parser.parse_args(argv)
    try:
        carrier_id, written = scaffold(args)
    except RegistryError as exc:
        sys.exit(str(exc))
    for path in written:
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    print(f"\nnext:\n  1. add its credentials to CB_CARRIER_SECRETS under {carrier_id!r}\n"
          f"  2. .venv/bin/pytest tests/test_conformance.py -k {carrier_id}")


if __name__ == "__main__":
    main()
