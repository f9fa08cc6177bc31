"""Drains the outbox into OpenSearch in bulk batches.

Each document goes to its event day's index under its own id with the outbox row id as an
external version: delivering a row again (a crash after the bulk call, before the rows were
marked) is refused as a version conflict and counted as done; a later row for the same
document (an SMS stored, then acted on) overwrites an earlier one, never the reverse.

An outage (connection refused, timeouts, a 5xx for the whole request) leaves every row pending
and the drainer backs off; a document OpenSearch refuses (mapping) is retried a few times and
then set aside with its error, so one bad row never blocks the queue.

``python -m traceability.indexer`` runs a drainer until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from pathlib import Path
from typing import Any

from opensearchpy import OpenSearch, helpers
from opensearchpy.exceptions import ConnectionError as OpenSearchConnectionError
from opensearchpy.exceptions import NotFoundError, RequestError, TransportError
from sqlalchemy.engine import Engine

from traceability.documents import INDEX_PATTERN
from traceability.outbox import document_count, mark_indexed, mark_refused, pending

log = logging.getLogger("traceability.indexer")

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "opensearch"
TEMPLATE_NAME = "cb-interactions"
ISM_POLICY_ID = "cb-interactions-retention"
# per-item statuses that are OpenSearch's load, not the document's fault: try again later
_LATER = frozenset({429, 502, 503, 504})


def load_template() -> dict[str, Any]:
    return dict(json.loads((DEPLOY_DIR / "cb-interactions-template.json").read_text()))


def load_ism_policy() -> dict[str, Any]:
    return dict(json.loads((DEPLOY_DIR / "cb-interactions-ism.json").read_text()))


def make_client(url: str, timeout_seconds: float = 10.0) -> OpenSearch:
    # one retry only: an outage is the drainer's to back off from, not the client's to hide
    return OpenSearch(hosts=[url], timeout=timeout_seconds, max_retries=1,
                      retry_on_timeout=False)


def ensure_templates(client: OpenSearch) -> bool:
    """Puts the index template (idempotent) and, where the ISM plugin exists, the retention
    policy. True when the policy was installed; False when the server has no ISM (osmem)."""
    client.indices.put_index_template(name=TEMPLATE_NAME, body=load_template())
    path = f"/_plugins/_ism/policies/{ISM_POLICY_ID}"
    try:
        current = client.transport.perform_request("GET", path)
    except NotFoundError:
        current = None
    except RequestError as exc:  # "no handler found": no ISM plugin on this server
        log.info("no ISM on this server (%s): retention policy not installed", exc.error)
        return False
    params: dict[str, Any] = {}
    if isinstance(current, dict) and "_seq_no" in current:
        params = {"if_seq_no": current["_seq_no"], "if_primary_term": current["_primary_term"]}
    client.transport.perform_request("PUT", path, params=params, body=load_ism_policy())
    return True


def indexed_counts(engine: Engine, client: OpenSearch) -> tuple[int, int]:
    """(documents in OpenSearch, distinct documents in the outbox): "indexed N of M"."""
    client.indices.refresh(index=INDEX_PATTERN)
    indexed = int(client.count(index=INDEX_PATTERN)["count"])
    return indexed, document_count(engine)


class OutboxDrainer:
    def __init__(self, engine: Engine, client: OpenSearch, batch_size: int = 500, *,
                 idle_seconds: float = 1.0, max_backoff_seconds: float = 30.0,
                 refresh: bool = False) -> None:
        self._engine = engine
        self._client = client
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self.max_backoff_seconds = max_backoff_seconds
        # tests ask for refresh so a count right after a drain sees the documents
        self._refresh = refresh
        self._templates_ready = False
        # why the last drain indexed nothing (an outage); None when OpenSearch answered
        self.last_error: str | None = None

    def drain_once(self) -> int:
        """Sends one batch; returns how many rows are now indexed (0 during an outage)."""
        rows = pending(self._engine, self.batch_size)
        if not rows:
            self.last_error = None
            return 0
        actions = [{"_op_type": "index", "_index": row.index_name, "_id": row.doc_id,
                    "version": row.id, "version_type": "external",
                    "_source": json.loads(row.document)} for row in rows]
        done: list[int] = []
        refused: dict[int, str] = {}
        try:
            if not self._templates_ready:  # a restarted (or new) cluster gets its mapping first
                ensure_templates(self._client)
                self._templates_ready = True
            # one chunk, no per-item retries: results come back in the order sent
            results = helpers.streaming_bulk(
                self._client, actions, chunk_size=len(actions), max_chunk_bytes=50 * 1024 * 1024,
                raise_on_error=False, raise_on_exception=True, max_retries=0, yield_ok=True,
                refresh=self._refresh)
            for row, (ok, item) in zip(rows, results, strict=True):
                assert row.id is not None
                result: dict[str, Any] = next(iter(item.values()), {})
                status = int(result.get("status", 0))
                if ok or status == 409:  # 409: this version or a newer one is already there
                    done.append(row.id)
                elif status not in _LATER:
                    refused[row.id] = json.dumps(result.get("error"))[:1000]
        except (OpenSearchConnectionError, TransportError) as exc:
            self._templates_ready = False
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("OpenSearch unavailable, %d rows wait: %s", len(rows), self.last_error)
            mark_indexed(self._engine, done)  # what was confirmed before the failure
            return len(done)
        mark_indexed(self._engine, done)
        if refused:
            log.error("OpenSearch refused %d documents, e.g. %s", len(refused),
                      next(iter(refused.values())))
            mark_refused(self._engine, refused)
        self.last_error = None
        return len(done)

    async def run(self, stop: asyncio.Event) -> None:
        """Drains until ``stop`` is set: at once while a full batch came back, every
        ``idle_seconds`` when idle, with doubling delays while OpenSearch (or the database)
        is out of reach."""
        backoff = self.idle_seconds
        while not stop.is_set():
            try:
                indexed = await asyncio.to_thread(self.drain_once)
            except Exception as exc:  # the database away: keep the process, retry later
                log.exception("outbox drain failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                indexed = 0
            if self.last_error is not None:
                delay = backoff
                backoff = min(backoff * 2, self.max_backoff_seconds)
            else:
                backoff = self.idle_seconds
                delay = 0.0 if indexed >= self.batch_size else self.idle_seconds
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)


async def _serve(args: argparse.Namespace) -> None:
    from models.db import make_engine
    from settings import get_settings

    settings = get_settings()
    url = args.url or settings.opensearch_url
    if not url:
        raise SystemExit("no OpenSearch: set CB_OPENSEARCH_URL or pass --url")
    engine = make_engine(settings.database_url)
    client = make_client(url)
    drainer = OutboxDrainer(engine, client, args.batch_size, idle_seconds=args.idle_seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("draining the outbox into %s", url)
    try:
        await drainer.run(stop)
    finally:
        client.close()
        engine.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Index the traceability outbox into OpenSearch")
    parser.add_argument("--url", help="OpenSearch URL (default: CB_OPENSEARCH_URL)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--idle-seconds", type=float, default=1.0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
