"""Capacity model: 100 million charges a day spread over the registry's countries, time zones,
charging windows and carriers' preferred hours; prints charges per second for each UTC hour,
the peak, and each carrier's busiest hour against its ``rate_limit_per_second``.

Run: ``.venv/bin/python scripts/capacity_model.py [--date 2027-01-15] [--charges 100000000]``.
Every figure it prints follows from the data files and from the ASSUMPTIONS below, which are
assumptions (not measurements) and are restated in docs/capacity.md.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: the project's packages are beside scripts/
    sys.path.insert(0, str(ROOT))

from carriers.loader import Registry, load_registry  # noqa: E402

RULES_DIR = ROOT / "rules" / "data"

# --- ASSUMPTIONS -------------------------------------------------------------------------------
SUBSCRIBERS_TOTAL_M = 282
# ASSUMPTION: subscribers (millions) per registry country; roughly in line with the size of each
# mobile market, scaled to 282 M. Charges per day are split in the same proportion.
SUBSCRIBERS_M: dict[str, int] = {
    "BR": 60, "MX": 40, "JP": 35, "NG": 35, "DE": 20, "GB": 15, "FR": 15, "IT": 15,
    "ES": 12, "PL": 10, "ZA": 10, "KE": 8, "PT": 3, "KW": 2, "BH": 2,
}
# ASSUMPTION: a country's subscribers live in its first listed zone, the rest share this remainder
OTHER_ZONES_SHARE = 0.10
# ASSUMPTION: a country's charges split equally between its carriers
# ASSUMPTION: inside the window an hour's weight is DECAY ** (hours from the carrier's preferred
# hour); renewals go to the preferred hour (rules.windows.local_charge_time), first charges of
# new subscriptions, retries and interval plans fill the rest of the window
DECAY = 0.5
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountryWindow:
    code: str
    start_minute: int
    end_minute: int
    zones: tuple[str, ...]


@dataclass
class CarrierLoad:
    carrier_id: str
    country: str
    rate_limit_per_second: float
    preferred_minute: int | None
    per_day: float = 0.0
    by_utc_hour: list[float] = field(default_factory=lambda: [0.0] * 24)

    @property
    def peak_per_second(self) -> float:
        return max(self.by_utc_hour) / 3600.0


@dataclass
class Model:
    day: date
    charges_per_day: float
    by_utc_hour: list[float]
    carriers: list[CarrierLoad]

    @property
    def peak_hour(self) -> int:
        return max(range(24), key=lambda h: self.by_utc_hour[h])

    @property
    def peak_per_second(self) -> float:
        return self.by_utc_hour[self.peak_hour] / 3600.0

    @property
    def average_per_second(self) -> float:
        return self.charges_per_day / 86400.0


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def load_windows(registry: Registry, rules_dir: Path = RULES_DIR) -> dict[str, CountryWindow]:
    data = tomllib.loads((rules_dir / "countries.toml").read_text(encoding="utf-8"))
    windows: dict[str, CountryWindow] = {}
    for code, country in registry.countries.items():
        start, end = str(data[code]["window"]).split("-")
        windows[code] = CountryWindow(code, _minutes(start), _minutes(end), tuple(country.timezones))
    return windows


def load_preferred(rules_dir: Path = RULES_DIR) -> dict[str, int]:
    data = tomllib.loads((rules_dir / "carriers.toml").read_text(encoding="utf-8"))
    return {carrier_id: _minutes(str(entry["preferred_hour"]))
            for carrier_id, entry in data.items() if "preferred_hour" in entry}


def hour_weights(window: CountryWindow, preferred_minute: int | None) -> dict[int, float]:
    """Local hour -> share of the carrier's daily charges (sums to 1)."""
    first, last = window.start_minute // 60, (window.end_minute - 1) // 60
    anchor = (preferred_minute if preferred_minute is not None else window.start_minute) // 60
    raw = {hour: DECAY ** abs(hour - anchor) for hour in range(first, last + 1)}
    total = sum(raw.values())
    return {hour: weight / total for hour, weight in raw.items()}


def zone_shares(zones: tuple[str, ...]) -> dict[str, float]:
    if len(zones) == 1:
        return {zones[0]: 1.0}
    rest = OTHER_ZONES_SHARE / (len(zones) - 1)
    return {zone: (1.0 - OTHER_ZONES_SHARE if i == 0 else rest) for i, zone in enumerate(zones)}


def utc_hour(day: date, local_hour: int, zone: str) -> int:
    local = datetime(day.year, day.month, day.day, local_hour, tzinfo=ZoneInfo(zone))
    return local.astimezone(UTC).hour


def build(day: date, charges_per_day: float = 100_000_000, registry: Registry | None = None,
          subscribers_m: Mapping[str, float] = SUBSCRIBERS_M) -> Model:
    registry = registry or load_registry()
    missing = set(registry.countries) ^ set(subscribers_m)
    if missing:
        raise SystemExit(f"subscriber split and registry disagree on countries: {sorted(missing)}")
    windows, preferred = load_windows(registry), load_preferred()
    total_subscribers = sum(subscribers_m.values())
    by_utc = [0.0] * 24
    loads: list[CarrierLoad] = []
    for code in sorted(registry.countries):
        country_charges = charges_per_day * subscribers_m[code] / total_subscribers
        carriers = [c for c in registry.carriers.values() if registry.carrier_country[c.id] == code]
        for carrier in carriers:
            load = CarrierLoad(carrier.id, code, carrier.rate_limit_per_second,
                               preferred.get(carrier.id), country_charges / len(carriers))
            weights = hour_weights(windows[code], load.preferred_minute)
            for zone, share in zone_shares(windows[code].zones).items():
                for local_hour, weight in weights.items():
                    charges = load.per_day * share * weight
                    hour = utc_hour(day, local_hour, zone)
                    load.by_utc_hour[hour] += charges
                    by_utc[hour] += charges
            loads.append(load)
    return Model(day, charges_per_day, by_utc, loads)


def report(model: Model) -> str:
    lines = [f"Capacity model for {model.day.isoformat()}: {model.charges_per_day:,.0f} charges/day, "
             f"{SUBSCRIBERS_TOTAL_M} M subscribers",
             "", "| UTC hour | charges in the hour | charges/s | bar |", "|---|---:|---:|---|"]
    top = max(model.by_utc_hour) or 1.0
    ratio = model.peak_per_second / model.average_per_second
    for hour, charges in enumerate(model.by_utc_hour):
        bar = "#" * round(40 * charges / top)
        lines.append(f"| {hour:02d}:00 | {charges:,.0f} | {charges / 3600:,.0f} | {bar} |")
    lines += ["",
              f"average: {model.average_per_second:,.0f} charges/s; peak: "
              f"{model.peak_per_second:,.0f} charges/s in {model.peak_hour:02d}:00-"
              f"{model.peak_hour:02d}:59 UTC (peak/average {ratio:.2f})",
              "", "| carrier | country | charges/day | busiest UTC hour | charges/s then | "
              "rate_limit_per_second | needed / limit |", "|---|---|---:|---:|---:|---:|---:|"]
    over = 0
    for load in sorted(model.carriers, key=lambda c: -c.peak_per_second):
        busiest = max(range(24), key=lambda h: load.by_utc_hour[h])
        ratio = load.peak_per_second / load.rate_limit_per_second
        over += ratio > 1
        lines.append(f"| {load.carrier_id} | {load.country} | {load.per_day:,.0f} | {busiest:02d}:00 | "
                     f"{load.peak_per_second:,.0f} | {load.rate_limit_per_second:g} | {ratio:.1f}x |")
    limits = sum(c.rate_limit_per_second for c in model.carriers)
    lines += ["", f"carriers whose busiest hour exceeds their rate limit: {over} of {len(model.carriers)}; "
              f"sum of all rate limits: {limits:,.0f} charges/s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", type=date.fromisoformat, default=date(2027, 1, 15),
                        help="the day whose UTC offsets apply (daylight saving differs)")
    parser.add_argument("--charges", type=float, default=100_000_000, help="charges per day")
    args = parser.parse_args(argv)
    print(report(build(args.date, args.charges)))


if __name__ == "__main__":
    main()
