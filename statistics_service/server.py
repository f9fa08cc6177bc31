"""The statistics web server: ``/`` the page, ``/api/stats.json`` the same figures as JSON
(``?window=15m|24h|7d`` on both), ``/healthz``.

    python -m statistics_service.server --port 8090 --opensearch http://127.0.0.1:9200
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from statistics_service.best_hours import BEST_HOURS_PATH, read_best_hours
from statistics_service.page import render
from statistics_service.queries import (
    INDEX_PATTERN,
    RevenueTerms,
    SearchClient,
    Statistics,
    compute,
    parse_window,
)

log = logging.getLogger(__name__)

ReconciliationSummary = Callable[[], list[dict[str, Any]] | Awaitable[list[dict[str, Any]]]]
_MAX_WINDOW = timedelta(days=90)


class StatisticsApp:
    """Serves the statistics of ``client``'s interaction indices."""

    def __init__(self, client: SearchClient, terms: RevenueTerms,
                 default_window: timedelta = timedelta(hours=24),
                 reconciliation_summary: ReconciliationSummary | None = None,
                 best_hours_path: Path | None = BEST_HOURS_PATH,
                 index: str = INDEX_PATTERN) -> None:
        self._client = client
        self._terms = terms
        self._default_window = default_window
        self._reconciliation = reconciliation_summary
        self._best_hours_path = best_hours_path
        self._index = index

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/api/stats.json", self._json)
        app.router.add_get("/healthz", self._health)
        return app

    def _window(self, request: web.Request) -> timedelta:
        text = request.query.get("window")
        if text is None:
            return self._default_window
        try:
            window = parse_window(text)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        if window > _MAX_WINDOW:
            raise web.HTTPBadRequest(text="the window is at most 90d")
        return window

    async def _stats(self, request: web.Request) -> Statistics:
        window = self._window(request)
        return await asyncio.to_thread(compute, self._client, self._terms, window,
                                       index=self._index)

    async def _summary(self) -> tuple[list[dict[str, Any]] | None, str | None]:
        if self._reconciliation is None:
            return None, None
        try:
            result = self._reconciliation()
            if inspect.isawaitable(result):
                result = await result
            return list(result), None
        except Exception as exc:  # a broken report must not take the statistics down
            log.exception("reconciliation summary failed")
            return None, f"{type(exc).__name__}: {exc}"

    async def _page(self, request: web.Request) -> web.Response:
        stats = await self._stats(request)
        summary, error = await self._summary()
        best = read_best_hours(self._best_hours_path) if self._best_hours_path else None
        return web.Response(text=render(stats, summary, error, best), content_type="text/html")

    async def _json(self, request: web.Request) -> web.Response:
        stats = await self._stats(request)
        summary, error = await self._summary()
        body = stats.to_json()
        body["reconciliation"] = {"report": summary, "error": error}
        return web.json_response(body)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def main(argv: list[str] | None = None) -> None:
    from opensearchpy import OpenSearch

    from rules.resolve import shipped_rules

    parser = argparse.ArgumentParser(description="the carrier-billing statistics page")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--opensearch", required=True, help="OpenSearch URL")
    parser.add_argument("--window", default="24h", help="default sliding window, e.g. 60m, 24h")
    parser.add_argument("--database-url", default=None,
                        help="the ledger's database: shows the reconciliation reports")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    client: SearchClient = OpenSearch(hosts=[args.opensearch])
    summary = None
    if args.database_url:
        from models.db import make_engine
        from reconciliation.report import latest_runs

        engine = make_engine(args.database_url)

        def summary() -> list[dict[str, object]]:
            return latest_runs(engine)

    service = StatisticsApp(client, RevenueTerms.from_rules(shipped_rules()),
                            parse_window(args.window), reconciliation_summary=summary)
    print(f"statistics on http://{args.host}:{args.port}/", flush=True)
    web.run_app(service.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
