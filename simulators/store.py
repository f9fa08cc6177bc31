"""Where a simulated carrier keeps its records across restarts: one SQLite file in WAL mode.

Balances and transactions (the books), each family's own records (operations, payments, the
keys it has seen) as JSON, rotated credentials and id counters. Every money-moving write is
committed before the simulator answers; `atomic()` groups the writes of one operation (the
debit and the family's record of it) into one commit, so a crash never keeps one without the
other.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STATE_FILE = "simulator.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    carrier_id TEXT NOT NULL, msisdn TEXT NOT NULL, balance TEXT NOT NULL,
    PRIMARY KEY (carrier_id, msisdn));
CREATE TABLE IF NOT EXISTS transactions (
    server_reference TEXT PRIMARY KEY, carrier_id TEXT NOT NULL, seq INTEGER NOT NULL,
    client_correlator TEXT NOT NULL, msisdn TEXT NOT NULL, kind TEXT NOT NULL,
    amount TEXT NOT NULL, currency TEXT NOT NULL, reference_code TEXT NOT NULL,
    original_reference TEXT, created_at TEXT NOT NULL, visible_at REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS transactions_by_carrier ON transactions (carrier_id, seq);
CREATE TABLE IF NOT EXISTS records (
    family TEXT NOT NULL, record_id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (family, record_id));
CREATE TABLE IF NOT EXISTS credentials (carrier_id TEXT PRIMARY KEY, password TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def state_file(path: Path) -> Path:
    """A directory holds the default file name; anything else is the file itself."""
    return path / STATE_FILE if path.is_dir() else path


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = state_file(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: transactions are begun and committed explicitly by atomic()
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._depth = 0
        self._seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """One commit for everything written inside (nested blocks join the outer one)."""
        if self._depth == 0:
            self._db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            self._db.execute("COMMIT")

    def clear(self) -> None:
        with self.atomic():
            for table in ("accounts", "transactions", "records", "credentials", "counters"):
                self._db.execute(f"DELETE FROM {table}")  # noqa: S608 (fixed names)

    # -- books ---------------------------------------------------------------------------------

    def save_account(self, carrier_id: str, msisdn: str, balance: str) -> None:
        with self.atomic():
            self._db.execute(
                "INSERT INTO accounts (carrier_id, msisdn, balance) VALUES (?, ?, ?) "
                "ON CONFLICT (carrier_id, msisdn) DO UPDATE SET balance = excluded.balance",
                (carrier_id, msisdn, balance))

    def accounts(self, carrier_id: str) -> list[tuple[str, str]]:
        return list(self._db.execute(
            "SELECT msisdn, balance FROM accounts WHERE carrier_id = ? ORDER BY rowid",
            (carrier_id,)))

    def save_transaction(self, row: dict[str, Any]) -> None:
        with self.atomic():
            self._db.execute(
                "INSERT INTO transactions (server_reference, carrier_id, seq, client_correlator, "
                "msisdn, kind, amount, currency, reference_code, original_reference, created_at, "
                "visible_at) VALUES (:server_reference, :carrier_id, :seq, :client_correlator, "
                ":msisdn, :kind, :amount, :currency, :reference_code, :original_reference, "
                ":created_at, :visible_at)", row)

    def transactions(self, carrier_id: str) -> list[dict[str, Any]]:
        cursor = self._db.execute(
            "SELECT * FROM transactions WHERE carrier_id = ? ORDER BY seq", (carrier_id,))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    # -- each family's records -----------------------------------------------------------------

    def save_record(self, family: str, record_id: str, data: dict[str, Any]) -> None:
        """Inserts or replaces; records load back in the order they were first saved."""
        with self.atomic():
            self._seq += 1
            self._db.execute(
                "INSERT INTO records (family, record_id, seq, data) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (family, record_id) DO UPDATE SET data = excluded.data",
                (family, record_id, self._seq, json.dumps(data)))

    def records(self, family: str) -> list[dict[str, Any]]:
        return [json.loads(data) for (data,) in self._db.execute(
            "SELECT data FROM records WHERE family = ? ORDER BY seq", (family,))]

    # -- credentials and counters --------------------------------------------------------------

    def save_password(self, carrier_id: str, password: str) -> None:
        with self.atomic():
            self._db.execute(
                "INSERT INTO credentials (carrier_id, password) VALUES (?, ?) "
                "ON CONFLICT (carrier_id) DO UPDATE SET password = excluded.password",
                (carrier_id, password))

    def passwords(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT carrier_id, password FROM credentials"))

    def next_id(self, name: str) -> int:
        with self.atomic():
            row = self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
                (name,)).fetchone()
        return int(row[0])
