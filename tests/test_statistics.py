"""Live statistics over a real in-memory OpenSearch-compatible server (osmem-server, started as
its own process): aggregations with known answers on synthetic interaction documents, the page
served on a real socket and rendered by headless Chromium, the JSON API, the command line, the
best charging hour and its floor of evidence."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from opensearchpy import OpenSearch, helpers
from osmem_server import OsmemServer

from rules.errors import RulesError
from rules.load import RulesData, load_rules
from settings import PROJECT_ROOT
from statistics_service.best_hours import (
    BestHour,
    EvidenceFloor,
    apply_best_hours,
    choose_hour,
    read_best_hours,
    refresh,
    write_best_hours,
)
from statistics_service.queries import (
    HourCount,
    RevenueTerms,
    Row,
    Statistics,
    compute,
    load_vat,
    parse_window,
)
from statistics_service.server import StatisticsApp
from tests.postgres import free_port

TEMPLATE = {
    "index_patterns": ["cb-interactions-*"],
    "template": {"mappings": {
        "dynamic_templates": [{"strings": {"match_mapping_type": "string",
                                           "mapping": {"type": "keyword"}}}],
        "properties": {
            "@timestamp": {"type": "date"}, "event": {"type": "keyword"},
            "carrier": {"type": "keyword"}, "country": {"type": "keyword"},
            "operation": {"type": "keyword"}, "outcome": {"type": "keyword"},
            "product": {"type": "keyword"}, "currency": {"type": "keyword"},
            "subscription_id": {"type": "long"}, "cycle": {"type": "integer"},
            "latency_ms": {"type": "integer"}, "amount_minor": {"type": "long"},
            "local_hour": {"type": "integer"}, "partial": {"type": "boolean"},
            "http_status": {"type": "integer"},
        }}},
}
# the figures the synthetic data below is built to give (VAT and shares stated, not read)
TERMS = RevenueTerms(vat={"FR": Decimal("0.20"), "DE": Decimal("0.19"), "GB": Decimal("0.20")},
                     share={"fr-azur": Decimal("0.35"), "de-rheinfunk": Decimal("0.30"),
                            "gb-mersey": Decimal("0.40")},
                     default_share=Decimal("0.5"))
END = datetime.now(UTC).replace(microsecond=0)
CHROMIUM = os.environ.get("CB_CHROMIUM", "/usr/bin/chromium")


def _index(at: datetime) -> str:
    return f"cb-interactions-{at:%Y.%m.%d}"


def call(carrier: str, country: str, product: str, outcome: str, hour: int, latency: int,
         operation: str = "charge", minutes_ago: float = 5) -> dict[str, Any]:
    at = END - timedelta(minutes=minutes_ago)
    return {"_index": _index(at), "_source": {
        "@timestamp": at.isoformat(), "event": "carrier_call", "carrier": carrier,
        "country": country, "operation": operation, "outcome": outcome, "product": product,
        "local_hour": hour, "latency_ms": latency, "http_status": 200}}


def ledger(carrier: str, country: str, product: str, operation: str, amount: int, currency: str,
           hour: int, partial: bool = False, minutes_ago: float = 5) -> dict[str, Any]:
    at = END - timedelta(minutes=minutes_ago)
    return {"_index": _index(at), "_source": {
        "@timestamp": at.isoformat(), "event": "ledger", "carrier": carrier, "country": country,
        "product": product, "operation": operation, "amount_minor": amount, "currency": currency,
        "partial": partial, "local_hour": hour}}


def synthetic() -> list[dict[str, Any]]:
    """fr-azur: 8 charge attempts, 6 succeeded (75.0 %); 5 × €5.00 + one partial €2.50 charged,
    €3.50 refunded: gross €24.00, net of FR's 20 % VAT €20.00, net of the 35 % share €13.00.
    de-rheinfunk: 4 attempts, 1 succeeded (25.0 %); €11.90 gross, €10.00 net of VAT, €7.00 net.
    gb-mersey: 2 of 2; £6.00 gross, £5.00 net of VAT, £3.00 net. Plus noise the figures must not
    count: an hour-old-plus document outside a 1h window, callbacks, a refund call."""
    docs = []
    fr = [("succeeded", 100)] * 6 + [("insufficient_funds", 100), ("rejected", 900)]
    docs += [call("fr-azur", "FR", "puzzle-pass", o, 10, ms) for o, ms in fr]
    docs.append(call("fr-azur", "FR", "puzzle-pass", "succeeded", 10, 50, operation="refund"))
    docs += [call("de-rheinfunk", "DE", "news-plus", o, 9, 300)
             for o in ("succeeded", "transient", "transient", "insufficient_funds")]
    docs += [call("gb-mersey", "GB", "puzzle-pass", "succeeded", 10, 200)] * 2
    docs += [ledger("fr-azur", "FR", "puzzle-pass", "charge", 500, "EUR", 10)] * 5
    docs.append(ledger("fr-azur", "FR", "puzzle-pass", "charge", 250, "EUR", 10, partial=True))
    docs.append(ledger("fr-azur", "FR", "puzzle-pass", "refund", 350, "EUR", 10))
    docs.append(ledger("de-rheinfunk", "DE", "news-plus", "charge", 1190, "EUR", 9))
    docs += [ledger("gb-mersey", "GB", "puzzle-pass", "charge", 300, "GBP", 10)] * 2
    # outside a one-hour window
    docs.append(call("fr-azur", "FR", "puzzle-pass", "succeeded", 7, 100, minutes_ago=180))
    docs.append(ledger("fr-azur", "FR", "puzzle-pass", "charge", 10_000, "EUR", 7,
                       minutes_ago=180))
    # other events are not attempts
    at = END - timedelta(minutes=1)
    docs += [{"_index": _index(at), "_source": {
        "@timestamp": at.isoformat(), "event": event, "carrier": "fr-azur", "country": "FR",
        "operation": "charge", "outcome": "succeeded", "local_hour": 10}}
        for event in ("callback", "receipt", "sms_notice")]
    return docs


@pytest.fixture(scope="module")
def search() -> Iterator[OpenSearch]:
    with OsmemServer.start(japanese=False) as server:
        client = OpenSearch(hosts=[server.url])
        client.indices.put_index_template(name="cb-interactions", body=TEMPLATE)
        ok, errors = helpers.bulk(client, synthetic(), refresh=True)
        assert not errors and ok == len(synthetic())
        yield client


@pytest.fixture(scope="module")
def stats(search: OpenSearch) -> Statistics:
    return compute(search, TERMS, timedelta(hours=1), end=END)


def test_success_rate_attempts_and_outcomes(stats: Statistics) -> None:
    fr = stats.row("carrier", "fr-azur")
    assert fr is not None
    assert (fr.attempts, fr.succeeded, fr.success_rate) == (8, 6, 0.75)
    assert fr.outcomes == {"succeeded": 6, "insufficient_funds": 1, "rejected": 1}
    de = stats.row("carrier", "de-rheinfunk")
    assert de is not None and (de.attempts, de.success_rate) == (4, 0.25)
    assert (stats.total.attempts, stats.total.succeeded) == (14, 9)
    product = stats.row("product", "puzzle-pass")
    assert product is not None and (product.attempts, product.succeeded) == (10, 8)
    assert [r.key for r in stats.by["local_hour"]] == ["9", "10"]  # the 07h document is out
    hour = stats.row("local_hour", "10")
    assert hour is not None and hour.success_rate == 0.8
    assert stats.hourly["fr-azur"] == {10: HourCount(8, 6)}


def test_revenue_gross_and_net_of_vat_and_carrier_share(stats: Statistics) -> None:
    fr = stats.row("carrier", "fr-azur")
    assert fr is not None
    eur = fr.revenue["EUR"]
    assert (eur.charged_minor, eur.refunded_minor, eur.gross_minor) == (2750, 350, 2400)
    assert (eur.net_of_vat_minor, eur.net_minor) == (2000, 1300)
    assert (fr.partial_payments, eur.partial_minor, fr.refunds) == (1, 250, 1)
    country = stats.row("country", "DE")
    assert country is not None
    assert (country.revenue["EUR"].gross_minor, country.revenue["EUR"].net_of_vat_minor,
            country.revenue["EUR"].net_minor) == (1190, 1000, 700)
    # currencies are never added together; the total nets each carrier at its own share
    total = stats.total.revenue
    assert set(total) == {"EUR", "GBP"}
    assert (total["EUR"].gross_minor, total["EUR"].net_of_vat_minor,
            total["EUR"].net_minor) == (3590, 3000, 2000)
    assert (total["GBP"].gross_minor, total["GBP"].net_minor) == (600, 300)


def test_latency_percentiles(stats: Statistics) -> None:
    de = stats.row("carrier", "de-rheinfunk")
    fr = stats.row("carrier", "fr-azur")
    assert de is not None and fr is not None
    assert de.latency_ms == {"p50": 300.0, "p95": 300.0, "p99": 300.0}
    p50, p99 = fr.latency_ms["p50"], fr.latency_ms["p99"]
    assert p50 is not None and p99 is not None
    assert p50 == 100.0 and p99 > 500  # the one slow call shows at the tail only


def test_window_slides(search: OpenSearch) -> None:
    wide = compute(search, TERMS, parse_window("4h"), end=END)
    fr = wide.row("carrier", "fr-azur")
    assert fr is not None and (fr.attempts, fr.succeeded) == (9, 7)
    assert fr.revenue["EUR"].gross_minor == 12_400
    later = compute(search, TERMS, parse_window("30m"), end=END + timedelta(hours=1))
    assert later.total.attempts == 0 and later.total.revenue == {}
    with pytest.raises(ValueError):
        parse_window("0h")


def test_revenue_terms_come_from_the_rules_and_vat_covers_every_country() -> None:
    data = load_rules()
    vat = load_vat()
    assert set(vat) == set(data.countries)
    terms = RevenueTerms.from_rules(data)
    assert terms.carrier_share("fr-azur") == Decimal(str(data.carriers["fr-azur"].entry.revenue_share))
    assert terms.carrier_share("no-such-carrier") == Decimal("0.5")
    assert all(Decimal("0.3") <= s <= Decimal("0.6") for s in terms.share.values())
    # a document without a country is taxed by its carrier's country
    assert terms.vat_rate("(none)", "fr-azur") == vat["FR"]


# --- the page, served on a socket and rendered by a real browser --------------------------


class _Cells(HTMLParser):
    """Text of every element carrying data-metric, keyed (dim, key, metric)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str, str], str] = {}
        self.drawn: dict[tuple[str, str], int] = {}
        self.body: dict[str, str] = {}
        self._open: list[tuple[str, str, str] | None] = []
        self._chart = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if tag == "svg":
            self._chart = a.get("data-chart", "")
        if tag == "rect" and "data-drawn-px" in a:
            self.drawn[(self._chart, a["data-key"])] = int(a["data-drawn-px"])
        if tag in ("td", "b"):
            self._open.append((a["data-dim"], a["data-key"], a["data-metric"])
                              if "data-metric" in a and "data-dim" in a else None)
            if self._open[-1] is not None:
                self.cells[self._open[-1]] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "b") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1] is not None:
            self.cells[self._open[-1]] += data


@pytest.fixture
async def page_url(search: OpenSearch, tmp_path: Path) -> AsyncIterator[str]:
    best = tmp_path / "best_hours.toml"
    write_best_hours({"fr-azur": BestHour("fr-azur", 14, 120, 100, 10, 200, 120, "7d",
                                          "2025-01-01T00:00:00+00:00")}, best)

    def summary() -> list[dict[str, Any]]:
        return [{"carrier": "fr-azur", "status": "matched", "ledger": "€24.00"}]

    app = StatisticsApp(search, TERMS, timedelta(hours=1), summary, best).app()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _chromium(*args: str, profile: Path) -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh")
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def test_page_in_headless_chromium_shows_the_figures(page_url: str, tmp_path: Path) -> None:
    dom = await _chromium("--dump-dom", "--virtual-time-budget=3000", f"{page_url}/",
                          profile=tmp_path / "profile-dom")
    parsed = _Cells()
    parsed.feed(dom)
    assert parsed.body.get("data-rendered") == "yes"  # the browser ran the page's script
    cells = parsed.cells
    assert cells[("carrier", "fr-azur", "success_rate")] == "75.0%"
    assert cells[("carrier", "fr-azur", "attempts")] == "8"
    assert cells[("carrier", "fr-azur", "gross")] == "€24.00"
    assert cells[("carrier", "fr-azur", "net_of_vat")] == "€20.00"
    assert cells[("carrier", "fr-azur", "net")] == "€13.00"
    assert cells[("carrier", "de-rheinfunk", "success_rate")] == "25.0%"
    assert cells[("country", "DE", "net")] == "€7.00"
    assert cells[("product", "puzzle-pass", "success_rate")] == "80.0%"
    assert cells[("local_hour", "10", "key")] == "10h"
    assert cells[("total", "all", "gross")] == "€35.90 + £6.00"
    assert cells[("total", "all", "net")] == "€20.00 + £3.00"
    assert cells[("carrier", "fr-azur", "partial_payments")] == "1"
    assert cells[("carrier", "fr-azur", "refunds")] == "1"
    assert cells[("carrier", "de-rheinfunk", "latency_p50")] == "300 ms"
    assert cells[("hourly", "fr-azur:10", "success_rate")] == "75"
    # the bars were laid out to scale: 75 % is three times 25 %, 100 % four times
    fr, de, gb = (parsed.drawn[("carrier", c)] for c in ("fr-azur", "de-rheinfunk", "gb-mersey"))
    assert de > 0 and abs(fr - 3 * de) <= 2 and abs(gb - 4 * de) <= 2
    assert 'data-reconciliation="report"' in dom and "matched" in dom
    assert 'data-best-hour="fr-azur">14:00<' in dom

    shot = tmp_path / "statistics.png"
    await _chromium(f"--screenshot={shot}", "--window-size=1280,2200",
                    "--virtual-time-budget=3000", f"{page_url}/", profile=tmp_path / "profile-shot")
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (1280, 2200)
    assert shot.stat().st_size > 20_000  # a drawn page, not a blank one


async def test_json_api_and_reconciliation_absent(search: OpenSearch, tmp_path: Path) -> None:
    app = StatisticsApp(search, TERMS, timedelta(hours=1), None, tmp_path / "none.toml").app()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            body = (await client.get("/api/stats.json")).json()
            page = (await client.get("/")).text
            wide = (await client.get("/api/stats.json", params={"window": "4h"})).json()
            bad = await client.get("/api/stats.json", params={"window": "soon"})
    finally:
        await runner.cleanup()
    assert body["window"] == "1h" and body["reconciliation"] == {"report": None, "error": None}
    fr = next(r for r in body["by"]["carrier"] if r["key"] == "fr-azur")
    assert fr["success_rate"] == 0.75
    assert fr["revenue"] == [{"currency": "EUR", "charged_minor": 2750, "refunded_minor": 350,
                              "partial_minor": 250, "gross_minor": 2400, "net_of_vat_minor": 2000,
                              "net_minor": 1300}]
    assert wide["window"] == "4h" and wide["total"]["attempts"] == 15
    assert bad.status_code == 400
    assert '<p data-reconciliation="none">no report</p>' in page
    assert 'data-best-hours="none"' in page


def test_command_line_server(search: OpenSearch) -> None:
    port = free_port()
    url = search.transport.hosts[0]
    opensearch = f"http://{url['host']}:{url['port']}"
    process = subprocess.Popen(
        [sys.executable, "-m", "statistics_service.server", "--port", str(port),
         "--opensearch", opensearch, "--window", "1h"], cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(f"statistics on http://127.0.0.1:{port}/")
        body = httpx.get(f"http://127.0.0.1:{port}/api/stats.json", timeout=30).json()
        assert (body["total"]["attempts"], body["total"]["succeeded"]) == (14, 9)
        # the shipped rules: fr-azur's share and FR's VAT from the data files
        fr = next(r for r in body["by"]["carrier"] if r["key"] == "fr-azur")
        share = Decimal(str(load_rules().carriers["fr-azur"].entry.revenue_share))
        expected = Decimal(2400) / (1 + load_vat()["FR"]) * (1 - share)
        assert fr["revenue"][0]["net_minor"] == int(expected.to_integral_value())
    finally:
        process.terminate()
        process.wait(10)


# --- the best charging hour -----------------------------------------------------------------

FLOOR = EvidenceFloor(min_attempts=50, min_margin=0.05)


def test_choose_hour_needs_evidence_in_both_hours_and_a_margin() -> None:
    allowed = list(range(8, 21))
    # 14h is much better, with enough attempts in both hours: it wins
    assert choose_hour({10: HourCount(200, 120), 14: HourCount(60, 54)}, 10, allowed, FLOOR) == 14
    # the same rates on 49 attempts: below the floor, nothing changes
    assert choose_hour({10: HourCount(200, 120), 14: HourCount(49, 49)}, 10, allowed, FLOOR) is None
    # too little evidence on the hour in force to say it is worse
    assert choose_hour({10: HourCount(20, 2), 14: HourCount(500, 450)}, 10, allowed, FLOOR) is None
    # better, but by less than the margin (60 % vs 64 %)
    assert choose_hour({10: HourCount(100, 60), 14: HourCount(100, 64)}, 10, allowed, FLOOR) is None
    # exactly the margin is enough
    assert choose_hour({10: HourCount(100, 60), 14: HourCount(100, 65)}, 10, allowed, FLOOR) == 14
    # an hour outside the country's window is never chosen, however good
    assert choose_hour({10: HourCount(100, 60), 3: HourCount(900, 900)}, 10, allowed, FLOOR) is None


def _hourly_stats(hourly: dict[str, dict[int, HourCount]]) -> Statistics:
    """Statistics of a 7-day window holding only ``hourly``."""
    return Statistics(END - timedelta(days=7), END, Row("all"), {}, hourly)


def test_best_hours_file_is_written_only_above_the_floor_and_read_back(tmp_path: Path) -> None:
    data = load_rules()
    path = tmp_path / "best_hours.toml"
    in_force = data.carriers["fr-azur"].preferred_minute
    assert in_force == 600  # 10:00 in carriers.toml
    thin = _hourly_stats({"fr-azur": {10: HourCount(200, 100), 15: HourCount(30, 30)}})
    assert refresh(thin, data, FLOOR, path) == [] and not path.exists()

    strong = _hourly_stats({"fr-azur": {10: HourCount(200, 100), 15: HourCount(80, 60)},
                            "de-rheinfunk": {9: HourCount(500, 400), 11: HourCount(60, 50)}})
    moves = refresh(strong, data, FLOOR, path)
    assert [(m.carrier, m.previous_hour, m.hour) for m in moves] == [("fr-azur", 10, 15)]
    entry = read_best_hours(path)["fr-azur"]
    assert (entry.hour, entry.attempts, entry.succeeded, entry.previous_attempts) == (15, 80, 60, 200)
    assert entry.window == "7d"
    applied = apply_best_hours(data, path)
    assert applied.carriers["fr-azur"].preferred_minute == 15 * 60
    assert applied.carriers["de-rheinfunk"].preferred_minute == data.carriers["de-rheinfunk"].preferred_minute

    # the next run weighs against 15h, the hour now in force: 10h's old edge is not enough
    again = _hourly_stats({"fr-azur": {15: HourCount(100, 75), 10: HourCount(100, 78)}})
    assert refresh(again, data, FLOOR, path) == []
    assert read_best_hours(path)["fr-azur"].hour == 15


def test_apply_refuses_an_hour_outside_the_window(tmp_path: Path) -> None:
    data: RulesData = load_rules()
    path = tmp_path / "best_hours.toml"
    write_best_hours({"fr-azur": BestHour("fr-azur", 3, 100, 90, 10, 100, 50, "7d", "now")}, path)
    with pytest.raises(RulesError, match="outside"):
        apply_best_hours(data, path)


def test_shipped_best_hours_file_applies_to_the_shipped_rules() -> None:
    path = PROJECT_ROOT / "rules" / "data" / "best_hours.toml"
    assert path.is_file()
    applied = apply_best_hours(load_rules(), path)
    for carrier_id, entry in read_best_hours(path).items():
        assert applied.carrier(carrier_id).preferred_minute == entry.hour * 60


def test_ensure_chromium_script_finds_the_browser() -> None:
    script = PROJECT_ROOT / "scripts" / "ensure-chromium.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    found = shutil.which("chromium") or CHROMIUM
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
    assert "Chromium" in version.stdout
