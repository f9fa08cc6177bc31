"""The shipped rule data loads and is valid; bad data is refused naming file and field;
resolve_rules turns it into plain dataclasses Temporal can carry."""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from temporalio.converter import DataConverter

from carriers.loader import default_registry
from rules.errors import RulesError
from rules.load import DATA_DIR, RegistryView, RulesData, load_rules
from rules.resolve import resolve_rules, resolve_with, shipped_rules
from rules.types import ChargingRules


@pytest.fixture(autouse=True)
def callback_receiver() -> None:
    """These tests are pure: they need no Temporal server, simulator or callback receiver."""


def with_au_carrier(data: RulesData) -> RegistryView:
    """The registry plus an AU carrier (we have none yet), to resolve AU rules."""
    view = data.registry
    return RegistryView({**view.carrier_country, "au-test": "AU"},
                        {**view.carrier_protocol, "au-test": "oneapi"}, view.country_currency)


def test_the_shipped_data_is_valid_and_covers_every_registry_carrier() -> None:
    data = load_rules()
    registry = default_registry()
    assert set(registry.countries) | {"AU"} == set(data.countries)
    # every carrier has its own entry (the default exists only for carriers added later)
    assert set(registry.carriers) == set(data.carriers)
    for code, registered in registry.countries.items():
        assert data.countries[code].entry.currency == registered.currency
    for carrier in data.carriers.values():
        assert 0.3 <= carrier.entry.revenue_share <= 0.6
        if carrier.entry.balance_check:
            assert registry.carriers[carrier.id].protocol == "parlayx"


def test_published_figures_are_seeded() -> None:
    countries = load_rules().countries
    gb, it, fr, au = (countries[c] for c in ("GB", "IT", "FR", "AU"))
    assert gb.caps_minor == {"per_transaction": 4000, "per_month": 24000}
    assert gb.entry.receipt_after_charge
    assert it.entry.opt_in == "sms_pin" and it.entry.pin_digits >= 5
    assert fr.caps_minor["subscription_per_month"] == 1200
    assert fr.entry.monthly_reminder and fr.entry.stop_keyword_required
    assert au.entry.currency == "AUD" and au.caps_minor == {"per_month": 2000}
    assert au.entry.opt_in != "none"
    assert "C637:2019" in au.entry.sources and "10/21/CONS" in it.entry.sources


def test_at_least_four_distinct_regimes() -> None:
    data = load_rules()
    picked = [data.countries[c] for c in ("GB", "IT", "FR", "AU", "MX", "PL")]
    regimes = {c.entry.regime for c in picked}
    # distinct not only by name: by what they make the platform do
    behaviours = {(c.entry.opt_in, tuple(sorted(c.caps_minor.items())), c.entry.window,
                   c.entry.after_retries) for c in picked}
    assert len(regimes) == 6 and len(behaviours) == 6


def test_resolve_gb_monthly() -> None:
    rules = resolve_rules("GB", "gb-thames", "game-pass", 399, "monthly")
    assert (rules.currency, rules.timezone) == ("GBP", "Europe/London")
    assert (rules.window_start_minute, rules.window_end_minute, rules.preferred_minute) == (480, 1260, 540)
    assert rules.caps.per_transaction_minor == 4000 and rules.caps.per_month_minor == 24000
    assert rules.retry_delays_seconds == [3600, 14400, -1]
    assert rules.ladder_minor == [399] and rules.blocked is None
    assert rules.receipt_after_charge and rules.opt_in_deadline_seconds == 900


def test_subscription_only_rules_follow_the_period() -> None:
    monthly = resolve_rules("FR", "fr-azur", "game-pass", 499, "monthly")
    one_off = resolve_rules("FR", "fr-azur", "gem-pack", 299, "one_off")
    assert monthly.caps.subscription_per_month_minor == 1200 and monthly.monthly_reminder
    assert one_off.caps.subscription_per_month_minor is None and not one_off.monthly_reminder
    it_monthly = resolve_rules("IT", "it-tirreno", "game-pass", 499, "monthly")
    it_weekly = resolve_rules("IT", "it-tirreno", "game-pass", 125, "weekly")
    assert it_monthly.renewal_reminder_days_before == 3
    assert it_weekly.renewal_reminder_days_before is None


def test_subscriber_zone_overrides_the_country_default() -> None:
    rules = resolve_rules("MX", "mx-maya", "game-pass", 8900, "monthly", "America/Monterrey")
    assert rules.timezone == "America/Monterrey"
    assert resolve_rules("MX", "mx-maya", "game-pass", 8900, "monthly").timezone == "America/Mexico_City"


def test_carrier_retry_overrides_and_default_fallback() -> None:
    data = shipped_rules()
    za = resolve_with(data, "ZA", "za-springbok", "game-pass", 4900, "monthly")
    assert za.max_retries_per_cycle == 4 and za.max_retries_per_day == 2
    au = resolve_with(load_rules(registry=with_au_carrier(data)), "AU", "au-test", "game-pass",
                      299, "monthly")
    # no carriers.toml entry: the documented default
    assert (au.preferred_minute, au.maintenance, au.balance_check) == (None, [], False)
    assert au.currency == "AUD" and au.caps.per_month_minor == 2000


def test_a_carrier_of_another_country_is_refused() -> None:
    with pytest.raises(RulesError, match="gb-thames: not a carrier of FR"):
        resolve_rules("FR", "gb-thames", "game-pass", 399, "monthly")


def test_blocked_by_category_age_and_price() -> None:
    data = shipped_rules()
    base = data.products["game-pass"]
    adult = RulesData(data.countries, data.carriers, data.default_carrier,
                      {**data.products, "game-pass": base.model_copy(update={"age_rating": 18}),
                       "gem-pack": base.model_copy(update={"category": "gambling"})}, data.registry)
    assert resolve_with(adult, "GB", "gb-thames", "game-pass", 399, "monthly").blocked == (
        "GB.minimum_age: game-pass is rated 18+ but carrier billing in GB only shows the payer is 16+")
    refused = resolve_with(adult, "IT", "it-tirreno", "gem-pack", 99, "one_off").blocked
    assert refused is not None and refused.startswith("IT.blocked_categories: gem-pack is 'gambling'")
    over = resolve_rules("GB", "gb-thames", "game-pass", 4001, "monthly").blocked
    assert over == "GB.per_transaction: the price £40.01 is over the cap of £40.00 per transaction"
    fr = resolve_rules("FR", "fr-azur", "game-pass", 1299, "monthly").blocked
    assert fr is not None and fr.startswith("FR.subscription_per_month: the price €12.99")


def test_charging_rules_round_trip_through_temporals_default_converter() -> None:
    rules = resolve_rules("ZA", "za-springbok", "game-pass", 4900, "monthly")
    converter = DataConverter.default.payload_converter
    payload = converter.to_payloads([rules])
    back = converter.from_payloads(payload, [ChargingRules])[0]
    assert back == rules and asdict(back)["maintenance"] == []


# --- bad data: each case edits one line of a copy of the shipped files -----------------------

@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(DATA_DIR, target)
    return target


def edit(directory: Path, file: str, old: str, new: str) -> None:
    path = directory / file
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


GB_MAINTENANCE = """[gb-thames]
preferred_hour = "09:00"
maintenance = [{ day = "sun", start = "02:00", end = "04:00" }]"""


def gb_maintenance(old: str, new: str) -> str:
    return GB_MAINTENANCE.replace(old, new)


BAD = [
    ("countries.toml", 'per_month = "240.00"', 'per_month = "-1"', "GB.per_month",
     "greater than 0"),
    ("countries.toml", 'per_month = "240.00"', 'per_month = "240.001"', "GB.per_month",
     "more decimals than GBP"),
    ("countries.toml", 'window = "08:00-21:00"', 'window = "21:00-08:00"', "GB.window",
     "start before it ends"),
    ("countries.toml", 'window = "08:00-21:00"', 'window = "8am-9pm"', "GB.window", "HH:MM"),
    ("countries.toml", 'currency = "GBP"', 'currency = "EUR"', "GB.currency",
     "differs from the carrier registry's GBP"),
    ("countries.toml", 'timezone = "Europe/London"', 'timezone = "Europe/Londres"',
     "GB.timezone", "unknown IANA timezone"),
    ("countries.toml", 'retry_delays = ["1h", "4h", "next_window"]',
     'retry_delays = ["1h", "soon"]', "GB.retry_delays.1", "positive duration"),
    ("countries.toml", "pin_digits = 5", "pin_digits = 3", "IT.pin_digits", "4+ digits"),
    ("countries.toml", 'after_retries = "suspend"', 'after_retries = "retry"',
     "GB.after_retries", "'skip', 'suspend' or 'cancel'"),
    ("countries.toml", "[GB]", "[gb]", "gb", "ISO 3166 alpha-2, upper case"),
    ("countries.toml", 'regime = "UK Payment Services', 'regim = "UK Payment Services',
     "GB.regime", "Field required"),
    ("countries.toml", "minimum_age = 16\n", "minimum_age = 16\nmaximum_age = 99\n",
     "GB.maximum_age", "Extra inputs"),
    ("carriers.toml", '[gb-thames]\npreferred_hour = "09:00"',
     '[gb-thames]\npreferred_hour = "22:00"', "gb-thames.preferred_hour",
     "outside GB's window 08:00-21:00"),
    ("carriers.toml", "ladder = [1.0, 0.5, 0.25]", "ladder = [0.5, 0.25]", "mx-maya.ladder.0",
     "starts at 1.0"),
    ("carriers.toml", "ladder = [1.0, 0.5, 0.25]", "ladder = [1.0, 0.25, 0.5]",
     "mx-maya.ladder.2", "must descend"),
    ("carriers.toml", 'ladder = [1.0, "20.00", "10.00"]', 'ladder = [1.0, "10.00", "20.00"]',
     "za-springbok.ladder.2", "must descend"),
    ("carriers.toml", "[gb-mersey]", "[gb-severn]", "gb-severn",
     "not a carrier in the carrier registry"),
    ("carriers.toml", '[gb-mersey]\npreferred_hour = "10:00"',
     '[gb-mersey]\npreferred_hour = "10:00"\nbalance_check = true', "gb-mersey.balance_check",
     "protocol 'smpp' offers no balance look-up"),
    ("carriers.toml", "balance_policy = \"postpone\"",
     "balance_policy = \"postpone\"\nladder = [1.0, 0.5]", "kw-dasman.ladder",
     "need balance_policy 'ladder'"),
    ("carriers.toml", GB_MAINTENANCE, gb_maintenance('"02:00", end = "04:00"', '"04:00", end = "02:00"'),
     "gb-thames.maintenance.0.end",
     "must be after start"),
    ("carriers.toml", GB_MAINTENANCE, gb_maintenance('"sun"', '"sunday"'), "gb-thames.maintenance.0",
     "not one of mon"),
    ("carriers.toml", GB_MAINTENANCE, gb_maintenance('"02:00", end = "04:00"', '"07:00", end = "22:00"'),
     "gb-thames.maintenance",
     "leaves no charging time on weekday 6"),
    ("carriers.toml", "revenue_share = 0.3\n", "revenue_share = 0.9\n", "de-rheinfunk.revenue_share",
     "less than or equal to 0.6"),
    ("carriers.toml", "[default]", "[fallback]", "default", "fallback for carriers"),
    ("products.toml", "[gem-pack]", "[gem-chest]", "gem-chest", "not a product in models/catalog.toml"),
]


@pytest.mark.parametrize(("file", "old", "new", "field", "message"), BAD,
                         ids=[f"{b[0]}:{b[3]}" for b in BAD])
def test_bad_data_names_file_and_field(data_copy: Path, file: str, old: str, new: str,
                                       field: str, message: str) -> None:
    edit(data_copy, file, old, new)
    with pytest.raises(RulesError) as caught:
        load_rules(data_copy)
    assert caught.value.file.endswith(file) and caught.value.field == field
    assert re.search(re.escape(message), caught.value.message), caught.value.message
    assert str(caught.value).startswith(f"{caught.value.file}: {field}: ")


def test_a_registry_country_without_rules_is_refused(data_copy: Path) -> None:
    text = (data_copy / "countries.toml").read_text(encoding="utf-8")
    start = text.index("[KE]")
    end = text.index("[NG]")
    (data_copy / "countries.toml").write_text(text[:start] + text[end:], encoding="utf-8")
    with pytest.raises(RulesError, match="countries.toml: KE: the carrier registry has this country"):
        load_rules(data_copy)


def test_not_toml_is_refused(data_copy: Path) -> None:
    (data_copy / "products.toml").write_text("[game-pass\n", encoding="utf-8")
    with pytest.raises(RulesError, match=r"products.toml: not valid TOML"):
        load_rules(data_copy)


def test_a_missing_file_is_refused(data_copy: Path) -> None:
    (data_copy / "carriers.toml").unlink()
    with pytest.raises(RulesError, match=r"carriers.toml: file is missing"):
        load_rules(data_copy)
