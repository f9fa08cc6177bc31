"""The statistics page: one self-contained HTML document (inline CSS, hand-written inline SVG
charts, no script or font from anywhere else). Every figure is rendered on the server, in an
element carrying ``data-dim``, ``data-key`` and ``data-metric``, so a test reading the DOM a
browser built finds the numbers where a person sees them. A small inline script only measures
the laid-out bars (``data-drawn-px``) and marks the page ``data-rendered="yes"``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from rules.money_text import show
from statistics_service.best_hours import BestHour
from statistics_service.queries import MISSING, Money, Row, Statistics, show_window

TITLES = {"carrier": "By carrier", "country": "By country", "product": "By product",
          "local_hour": "By local hour of day"}
_BAR_PX = 360
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2430;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.muted{color:#667}.tiles{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.tile{background:#fff;border:1px solid #dde;border-radius:6px;padding:10px 14px;min-width:130px}
.tile b{display:block;font-size:20px}
table{border-collapse:collapse;background:#fff;margin:6px 0}
th,td{border:1px solid #dde;padding:4px 8px;text-align:right;white-space:nowrap}th{background:#f0f2f6}
td.k,th.k{text-align:left}svg{background:#fff;border:1px solid #dde;border-radius:6px}
.bar{fill:#3b7dd8}.bar.low{fill:#d8843b}.heat td{min-width:22px;padding:2px;font-size:11px}
"""
_SCRIPT = """
for (const bar of document.querySelectorAll('svg rect.bar')) {
  const box = bar.getBoundingClientRect();
  bar.dataset.drawnPx = Math.round(bar.dataset.axis === 'y' ? box.height : box.width);
}
document.body.dataset.rendered = 'yes';
"""


def percent(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.1f}%"


def millis(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms"


def _cell(dim: str, key: str, metric: str, text: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return (f'<td{klass} data-dim="{escape(dim)}" data-key="{escape(key)}" '
            f'data-metric="{metric}">{escape(text)}</td>')


def _money_lines(revenue: Mapping[str, Money], field: str) -> str:
    if not revenue:
        return "–"
    return " + ".join(show(int(getattr(m, field)), c) for c, m in sorted(revenue.items()))


def _label(dim: str, key: str) -> str:
    return f"{int(key):02d}h" if dim == "local_hour" and key.isdigit() else key


def _table(dim: str, rows: Sequence[Row]) -> str:
    head = ("<tr><th class=k>" + escape(dim.replace("_", " ")) + "</th><th>attempts</th>"
            "<th>succeeded</th><th>success rate</th><th>gross</th><th>net of VAT</th>"
            "<th>net to publisher</th><th>partial payments</th><th>refunds</th>"
            "<th>p50</th><th>p95</th><th>p99</th></tr>")
    body = []
    for r in rows:
        body.append("<tr>" + "".join([
            _cell(dim, r.key, "key", _label(dim, r.key), "k"),
            _cell(dim, r.key, "attempts", str(r.attempts)),
            _cell(dim, r.key, "succeeded", str(r.succeeded)),
            _cell(dim, r.key, "success_rate", percent(r.success_rate)),
            _cell(dim, r.key, "gross", _money_lines(r.revenue, "gross_minor")),
            _cell(dim, r.key, "net_of_vat", _money_lines(r.revenue, "net_of_vat_minor")),
            _cell(dim, r.key, "net", _money_lines(r.revenue, "net_minor")),
            _cell(dim, r.key, "partial_payments", str(r.partial_payments)),
            _cell(dim, r.key, "refunds", str(r.refunds)),
            *(_cell(dim, r.key, f"latency_{p}", millis(r.latency_ms.get(p)))
              for p in ("p50", "p95", "p99")),
        ]) + "</tr>")
    return f'<table data-table="{escape(dim)}">{head}{"".join(body)}</table>'


def rate_bars(dim: str, rows: Sequence[Row]) -> str:
    """Horizontal bars: each row's success rate, the attempts written beside it."""
    rows = [r for r in rows if r.attempts]
    if not rows:
        return '<p class="muted">no charge attempts in this window</p>'
    line, left = 22, 130
    height = line * len(rows) + 10
    parts = [f'<svg data-chart="{escape(dim)}" width="{left + _BAR_PX + 150}" height="{height}" '
             f'viewBox="0 0 {left + _BAR_PX + 150} {height}" role="img">']
    for i, r in enumerate(rows):
        y = 5 + i * line
        rate = r.success_rate or 0.0
        width = round(rate * _BAR_PX, 1)
        cls = "bar" if rate >= 0.5 else "bar low"
        parts.append(
            f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(_label(dim, r.key))}</text>'
            f'<rect class="{cls}" data-axis="x" data-key="{escape(r.key)}" data-value="{rate:.4f}" '
            f'x="{left}" y="{y}" width="{width}" height="{line - 6}"/>'
            f'<text x="{left + width + 6}" y="{y + 14}">{percent(r.success_rate)} of '
            f'{r.attempts}</text>')
    parts.append("</svg>")
    return "".join(parts)


def hour_columns(rows: Sequence[Row]) -> str:
    """Vertical bars over the 24 local hours: success rate (height) and attempts (label)."""
    by_hour = {int(r.key): r for r in rows if r.key.isdigit()}
    if not any(r.attempts for r in by_hour.values()):
        return ""
    col, top, plot = 28, 16, 160
    parts = [f'<svg data-chart="local_hour_columns" width="{24 * col + 20}" height="{top + plot + 40}" '
             f'viewBox="0 0 {24 * col + 20} {top + plot + 40}" role="img">']
    for hour in range(24):
        x = 10 + hour * col
        r = by_hour.get(hour)
        if r is not None and r.attempts:
            rate = r.success_rate or 0.0
            h = round(rate * plot, 1)
            parts.append(
                f'<rect class="bar" data-axis="y" data-key="{hour}" data-value="{rate:.4f}" '
                f'x="{x + 3}" y="{top + plot - h}" width="{col - 6}" height="{h}"/>'
                f'<text x="{x + col / 2}" y="{top + plot - h - 3}" font-size="9" '
                f'text-anchor="middle">{rate * 100:.0f}</text>')
        parts.append(f'<text x="{x + col / 2}" y="{top + plot + 14}" font-size="10" '
                     f'text-anchor="middle">{hour:02d}</text>')
    parts.append(f'<text x="10" y="{top + plot + 32}" font-size="11">success rate % by '
                 f"subscriber-local hour</text></svg>")
    return "".join(parts)


def heatmap(stats: Statistics) -> str:
    """Carrier × local hour success rates, the evidence behind the best charging hours."""
    if not stats.hourly:
        return ""
    head = "<tr><th class=k>carrier</th>" + "".join(f"<th>{h:02d}</th>" for h in range(24)) + "</tr>"
    body = []
    for carrier, hours in sorted(stats.hourly.items()):
        cells = []
        for hour in range(24):
            count = hours.get(hour)
            if count is None or not count.attempts:
                cells.append("<td></td>")
                continue
            rate = count.success_rate or 0.0
            shade = int(255 - rate * 140)
            cells.append(f'<td style="background:rgb({shade},{shade + (255 - shade) // 2},255)" '
                         f'title="{count.succeeded}/{count.attempts}" data-dim="hourly" '
                         f'data-key="{escape(carrier)}:{hour}" data-metric="success_rate">'
                         f"{rate * 100:.0f}</td>")
        body.append(f"<tr><td class=k>{escape(carrier)}</td>{''.join(cells)}</tr>")
    return f'<table class="heat" data-table="hourly">{head}{"".join(body)}</table>'


def _tiles(total: Row) -> str:
    tiles = [("attempts", "charge attempts", str(total.attempts)),
             ("success_rate", "success rate", percent(total.success_rate)),
             ("gross", "revenue, gross", _money_lines(total.revenue, "gross_minor")),
             ("net", "net to publisher", _money_lines(total.revenue, "net_minor")),
             ("partial_payments", "partial payments", str(total.partial_payments)),
             ("refunds", "refunds", str(total.refunds)),
             ("latency_p95", "latency p95", millis(total.latency_ms.get("p95")))]
    return '<div class="tiles">' + "".join(
        f'<div class="tile">{escape(label)}<b data-dim="total" data-key="all" '
        f'data-metric="{metric}">{escape(value)}</b></div>' for metric, label, value in tiles) + "</div>"


def reconciliation(summary: list[dict[str, Any]] | None, error: str | None = None) -> str:
    if error is not None:
        return f'<p data-reconciliation="error">report unavailable: {escape(error)}</p>'
    if summary is None:
        return '<p data-reconciliation="none">no report</p>'
    if not summary:
        return '<p data-reconciliation="empty">the report lists nothing</p>'
    columns: list[str] = []
    for entry in summary:
        columns += [c for c in entry if c not in columns]
    head = "<tr>" + "".join(f"<th class=k>{escape(str(c))}</th>" for c in columns) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td class=k>{escape(str(e.get(c, '')))}</td>" for c in columns)
                   + "</tr>" for e in summary)
    return f'<table data-reconciliation="report">{head}{body}</table>'


def best_hours_section(entries: Mapping[str, BestHour] | None) -> str:
    if not entries:
        return '<p class="muted" data-best-hours="none">no hour learnt yet: carriers.toml applies</p>'
    rows = "".join(
        f'<tr><td class=k>{escape(e.carrier)}</td><td data-best-hour="{escape(e.carrier)}">'
        f"{e.hour:02d}:00</td><td>{percent(e.success_rate)} of {e.attempts}</td>"
        f"<td>{e.previous_hour:02d}:00</td><td>{percent(e.previous_success_rate)} of "
        f"{e.previous_attempts}</td><td>{escape(e.computed_at)}</td></tr>"
        for _, e in sorted(entries.items()))
    return ("<table><tr><th class=k>carrier</th><th>best hour</th><th>evidence</th>"
            "<th>replaced</th><th>its evidence</th><th>learnt</th></tr>" + rows + "</table>")


def render(stats: Statistics, summary: list[dict[str, Any]] | None = None,
           summary_error: str | None = None,
           best_hours: Mapping[str, BestHour] | None = None) -> str:
    window = show_window(stats.window)
    sections = []
    for dim, title in TITLES.items():
        rows = stats.by.get(dim, [])
        chart = hour_columns(rows) if dim == "local_hour" else rate_bars(dim, rows)
        sections.append(f'<section data-section="{dim}"><h2>{escape(title)}</h2>{chart}'
                        f"{_table(dim, rows) if rows else ''}</section>")
    note = (f"Revenue per currency in the window; “net of VAT” removes each country's VAT "
            f"(rules/data/vat.toml), “net to publisher” also the carrier's revenue share. "
            f"Rows “{MISSING}” hold documents without that field.")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Carrier billing statistics – last {window}</title><style>{_CSS}</style></head>
<body data-window="{window}">
<h1>Carrier billing statistics</h1>
<p class="muted">last <b data-metric="window">{window}</b>: {stats.start:%Y-%m-%d %H:%M} to
{stats.end:%Y-%m-%d %H:%M} UTC · <a href="?window=1h">1h</a> · <a href="?window=24h">24h</a> ·
<a href="?window=7d">7d</a> · <a href="api/stats.json?window={window}">JSON</a></p>
{_tiles(stats.total)}
<p class="muted">{escape(note)}</p>
{"".join(sections)}
<section data-section="hourly"><h2>Success rate by carrier and local hour</h2>{heatmap(stats)}</section>
<section data-section="best_hours"><h2>Best charging hours</h2>{best_hours_section(best_hours)}</section>
<section data-section="reconciliation"><h2>Reconciliation</h2>{reconciliation(summary, summary_error)}
</section>
<script>{_SCRIPT}</script>
</body></html>
"""
