"""The chaos run's processes: each a child in its own session with a log under the data
directory, each killable (SIGKILL) and restartable on the same ports and the same durable state
(Temporal's SQLite file, the simulator's state directory, PostgreSQL's data directory)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from carriers.dev_secrets import generate_dev_secrets
from carriers.loader import Registry
from devstack import SQLITE_WAL, wait_for_port
from models.db import normalize_url
from settings import PROJECT_ROOT, venv_binary
from tests.postgres import free_port, private_postgres
from workflows import search_attributes as search_attrs

PG_TIMEOUT_SECONDS = 60.0


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    ports: tuple[int, ...] = ()
    ready_text: str | None = None
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0


@dataclass
class Postgres:
    """The private server of tests/postgres.py, with what it takes to stop and start it."""

    url: str
    data_dir: Path
    prefix: list[str]

    def pg_ctl(self, *args: str, timeout: float = PG_TIMEOUT_SECONDS) -> None:
        binary = shutil.which("pg_ctl") or _glob_pg_ctl()
        log = self.data_dir.parent / "chaos-pg.log"
        subprocess.run([*self.prefix, binary, "-D", str(self.data_dir), *args, "-l", str(log)],
                       check=False, capture_output=True, timeout=timeout)

    def stop(self) -> None:
        self.pg_ctl("-m", "immediate", "stop")

    def start(self) -> None:
        # without a running server, restart starts one with the options it was last given
        # (postmaster.opts): same port, socket directory and settings
        self.pg_ctl("-w", "-t", str(int(PG_TIMEOUT_SECONDS)), "restart")

    def restart(self, down_seconds: float) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


def _glob_pg_ctl() -> str:
    import glob
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if not found:
        raise RuntimeError("pg_ctl not found")
    return found[0]


@dataclass
class ChaosStack:
    data_dir: Path
    registry: Registry
    default_balance: str = "100000"
    secrets: dict[str, str] = field(default_factory=dict)
    children: dict[str, Child] = field(default_factory=dict)
    postgres: Postgres | None = None
    temporal_port: int = 0
    sim_port: int = 0
    smpp_port: int = 0
    callback_port: int = 0
    _exit: ExitStack = field(default_factory=ExitStack)

    # -- addresses and environment ----------------------------------------------------------

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def simulator_urls(self) -> dict[str, str]:
        return {"sim": self.sim_url, "smpp": f"127.0.0.1:{self.smpp_port}"}

    @property
    def database_url(self) -> str:
        assert self.postgres is not None
        return self.postgres.url

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": str(PROJECT_ROOT),
            "CB_CARRIER_SECRETS": json.dumps(self.secrets),
            "CB_DATABASE_URL": self.database_url,
            "CB_TEMPORAL_ADDRESS": self.temporal_address,
            "CB_SIMULATOR_URLS": json.dumps(self.simulator_urls),
            "CB_CALLBACK_PORT": str(self.callback_port),
            "CB_CALLBACK_BASE_URL": f"http://127.0.0.1:{self.callback_port}",
        })
        return env

    # -- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True)
        self.secrets = generate_dev_secrets(self.registry)
        url = self._exit.enter_context(private_postgres())
        self.postgres = _locate(url)
        self.temporal_port, self.sim_port = free_port(), free_port()
        self.smpp_port, self.callback_port = free_port(), free_port()
        env = self.env()
        temporal = [venv_binary("temporal"), "server", "start-dev", "--ip", "127.0.0.1",
                    "--port", str(self.temporal_port), "--headless", "--log-level", "warn",
                    "--db-filename", str(self.data_dir / "temporal.db"), *SQLITE_WAL]
        for key in search_attrs.ALL:
            temporal += ["--search-attribute", f"{key.name}=Keyword"]
        self._add("temporal", temporal, env, (self.temporal_port,))
        self._add("simulator", [sys.executable, "-m", "simulators.server", "--port",
                                str(self.sim_port), "--smpp-port", str(self.smpp_port),
                                "--state-dir", str(self.data_dir / "sim-state"),
                                "--default-balance", self.default_balance],
                  env, (self.sim_port, self.smpp_port))
        self._add("callbacks", [sys.executable, "-m", "callback_receiver"], env,
                  (self.callback_port,))
        self._add("worker", [sys.executable, str(PROJECT_ROOT / "worker.py")], env,
                  ready_text="worker polling")
        for name in ("temporal", "simulator", "callbacks", "worker"):
            self.launch(name)

    def _add(self, name: str, args: list[str], env: dict[str, str], ports: tuple[int, ...] = (),
             ready_text: str | None = None) -> None:
        self.children[name] = Child(name, args, env, self.data_dir / f"{name}.log", ports,
                                    ready_text)

    def launch(self, name: str, timeout: float = 90.0) -> None:
        """Starts (or starts again) one child and waits until it serves."""
        child = self.children[name]
        if child.alive():
            return
        offset = child.log_size()
        with open(child.log_path, "ab") as log:
            log.write(f"\n=== chaos: start {child.starts + 1} at {time.ctime()} ===\n".encode())
            log.flush()
            child.process = subprocess.Popen(child.args, stdout=log, stderr=subprocess.STDOUT,
                                             env=child.env, cwd=PROJECT_ROOT,
                                             start_new_session=True)
        child.starts += 1
        deadline = time.monotonic() + timeout
        for port in child.ports:
            wait_for_port(port, max(1.0, deadline - time.monotonic()))
        if child.ready_text is not None:
            self._wait_for_log(child, child.ready_text, offset, deadline)

    @staticmethod
    def _wait_for_log(child: Child, text: str, offset: int, deadline: float) -> None:
        needle = text.encode()
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited; see {child.log_path}")
            with open(child.log_path, "rb") as log:
                log.seek(offset)
                if needle in log.read():
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{child.name} not ready after its bound; see {child.log_path}")

    def kill(self, name: str) -> None:
        """SIGKILL, no warning: what a crash or an OOM kill looks like."""
        child = self.children[name]
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(signal.SIGKILL)
            child.process.wait(timeout=10)

    def down(self) -> list[str]:
        return [name for name, child in self.children.items() if not child.alive()]

    def stop(self) -> None:
        """Stops the children newest-dependent first, then the database."""
        for name in ("worker", "callbacks", "simulator", "temporal"):
            child = self.children.get(name)
            if child is None or child.process is None or child.process.poll() is not None:
                continue
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(timeout=10)
        self._exit.close()

    def emergency_stop(self) -> None:
        """For the watchdog: everything down now, no waiting on anyone."""
        for child in self.children.values():
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
        if self.postgres is not None:
            try:
                self.postgres.stop()
            except (OSError, subprocess.SubprocessError):
                pass


def _locate(url: str) -> Postgres:
    """Where the private server keeps its data (to stop and start it under load)."""
    engine = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            data_dir = Path(str(conn.execute(sa.text("SHOW data_directory")).scalar_one()))
    finally:
        engine.dispose()
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return Postgres(url, data_dir, prefix)


@contextmanager
def running(stack: ChaosStack) -> Iterator[ChaosStack]:
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
