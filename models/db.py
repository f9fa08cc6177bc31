"""Engine construction and schema migration (Alembic) for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_SETUP_LOCK_KEY = 7_270_001


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def normalize_url(url: str) -> str:
    # psycopg 3 is the PostgreSQL driver; accept the plain scheme from settings too.
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


@contextmanager
def setup_lock(url: str) -> Iterator[None]:
    """Serialises schema migration and seeding between workers starting together.
    PostgreSQL: a session advisory lock. SQLite: one process at a time already writes."""
    if not normalize_url(url).startswith("postgresql"):
        yield
        return
    engine = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _SETUP_LOCK_KEY})
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _SETUP_LOCK_KEY})
    engine.dispose()


def migrate(url: str) -> None:
    """Bring the schema at ``url`` up to the newest Alembic revision."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    command.upgrade(config, "head")


# -- blocking database calls from async code ---------------------------------------------------

_T = TypeVar("_T")
_P = ParamSpec("_P")
_EXECUTORS: weakref.WeakKeyDictionary[Engine, dict[str, ThreadPoolExecutor]] = \
    weakref.WeakKeyDictionary()
_EXECUTORS_LOCK = threading.Lock()
# PostgreSQL: as many threads as the engine's pool lends connections (pool_size + max_overflow)
_POSTGRES_THREADS = 30


def _executor(engine: Engine, lane: str) -> ThreadPoolExecutor:
    with _EXECUTORS_LOCK:
        lanes = _EXECUTORS.setdefault(engine, {})
        executor = lanes.get(lane)
        if executor is None:
            # SQLite lets one connection write at a time, and threads that collide wait in its
            # busy handler, which sleeps in steps of up to 100 ms: under load those sleeps
            # became the charge path's latency. One thread per SQLite engine queues our calls
            # in memory, in order, instead.
            sqlite = engine.dialect.name == "sqlite"
            executor = ThreadPoolExecutor(
                max_workers=1 if sqlite else _POSTGRES_THREADS,
                thread_name_prefix=f"db-{engine.dialect.name}-{lane}")
            lanes[lane] = executor
        return executor


async def in_db_thread(engine: Engine, call: Callable[_P, _T], *args: _P.args,
                       **kwargs: _P.kwargs) -> _T:
    """``call(*args, **kwargs)`` on ``engine``'s database thread(s), awaited without blocking the event
    loop (the caller's context variables go with it, as with ``asyncio.to_thread``)."""
    return await in_db_lane(engine, "main", functools.partial(call, *args, **kwargs))


async def in_db_lane(engine: Engine, lane: str, call: Callable[[], _T]) -> _T:
    """``call()`` on ``engine``'s thread(s) of ``lane``. A service whose database calls may wait
    on the worker's (the callback receiver, whose callbacks answer a carrier the worker's
    activity is talking to) has a lane of its own, so neither ever waits on the other's
    queue."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(
        _executor(engine, lane), functools.partial(context.run, call))


def insert_row(session: Session, row: Any) -> int:
    """Inserts ``row`` (a table model, complete but for its id) with one Core INSERT in the
    session's transaction and sets its id. The row stays outside the session: on the charge
    path the ORM's unit of work cost more than the insert itself."""
    table = type(row).__table__
    values = {c.name: getattr(row, c.name) for c in table.columns if not c.primary_key}
    result = session.execute(table.insert(), values)
    row.id = int(result.inserted_primary_key[0])  # type: ignore[attr-defined]
    return int(row.id)
