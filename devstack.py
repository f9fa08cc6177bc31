"""Starts the local stack as child processes: Temporal dev server, carrier simulator, workers.

Used by the demo and the benchmark; each child gets its own session so that Ctrl-C reaches
only this process, which then stops the children in order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from osmem_server import OsmemServer

import codec
from carriers.dev_secrets import generate_dev_secrets
from carriers.loader import default_registry
from settings import PROJECT_ROOT, venv_binary
from workflows import search_attributes as sa

CODEC_PORT = 8081
SQLITE_WAL = ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]


def wait_for_port(port: int, timeout: float = 60.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


class Stack:
    """The children started for one demo or benchmark run."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        # fresh credentials per run, shared by the simulator and the worker, never on disk
        self.carrier_secrets = generate_dev_secrets(default_registry())
        self._opensearch: OsmemServer | None = None
        # payloads are encrypted in the demo too; the codec server shows them in the UI
        self.codec_keys = {"dev": codec.new_key()}

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["CB_CARRIER_SECRETS"] = json.dumps(self.carrier_secrets)
        env["PYTHONPATH"] = str(PROJECT_ROOT)
        env["CB_CODEC_KEYS"] = json.dumps(self.codec_keys)
        env["CB_CODEC_CURRENT_KEY"] = "dev"
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.data_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the child)
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env or self.env(),
                                 cwd=PROJECT_ROOT, start_new_session=True)
        self.children.append((name, child))

    def start_temporal(self, port: int = 7233, ui_port: int = 8233,
                       persistence: str = "wal") -> None:
        """persistence: "memory", "sqlite" (plain file) or "wal" (file in WAL mode)."""
        if not port_is_free(port):
            raise RuntimeError(f"port {port} is taken: is another Temporal server running?")
        args = [venv_binary("temporal"), "server", "start-dev", "--ip", "127.0.0.1",
                "--port", str(port), "--ui-port", str(ui_port), "--log-level", "warn"]
        for key in sa.ALL:
            args += ["--search-attribute", f"{key.name}=Keyword"]
        args += ["--ui-codec-endpoint", f"http://127.0.0.1:{CODEC_PORT}"]
        if persistence != "memory":
            db = self.data_dir / "temporal.db"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            args += ["--db-filename", str(db)]
            if persistence == "wal":
                args += SQLITE_WAL
        self.spawn("temporal", args)
        wait_for_port(port)

    def start_simulator(self, port: int = 8701, smpp_port: int = 2775, chaos_rate: float = 0.0,
                        default_balance: str = "100") -> dict[str, str]:
        """Starts the HTTP carriers and the SMSC; returns the settings' simulator_urls."""
        for taken in (port, smpp_port):
            if not port_is_free(taken):
                raise RuntimeError(f"port {taken} is taken: is another simulator running?")
        self.spawn("simulator", [sys.executable, "-m", "simulators.server", "--port",
                                 str(port), "--smpp-port", str(smpp_port), "--chaos-rate",
                                 str(chaos_rate), "--default-balance", default_balance])
        wait_for_port(port)
        wait_for_port(smpp_port)
        return {"sim": f"http://127.0.0.1:{port}", "smpp": f"127.0.0.1:{smpp_port}"}

    def start_codec_server(self, port: int = CODEC_PORT) -> None:
        """Decodes payloads for the Temporal UI (loopback only, no token: see codec/server.py)."""
        if not port_is_free(port):
            raise RuntimeError(f"port {port} is taken: is another codec server running?")
        self.spawn("codec", [sys.executable, "-m", "codec.server", "--port", str(port)])
        wait_for_port(port)

    def start_opensearch(self, port: int = 9200) -> str:
        """The embedded OpenSearch-compatible server (in memory); returns its URL. Production
        runs real OpenSearch (deploy/)."""
        if not port_is_free(port):
            raise RuntimeError(f"port {port} is taken: is another OpenSearch running?")
        self._opensearch = OsmemServer.start(addr=f"127.0.0.1:{port}", japanese=False)
        return str(self._opensearch.url)

    def start_statistics(self, opensearch_url: str, database_url: str, port: int = 8090) -> str:
        """The statistics page (with the reconciliation reports); returns its URL."""
        if not port_is_free(port):
            raise RuntimeError(f"port {port} is taken: is another statistics page running?")
        self.spawn("statistics", [sys.executable, "-m", "statistics_service.server", "--port",
                                  str(port), "--opensearch", opensearch_url, "--database-url",
                                  database_url])
        wait_for_port(port)
        return f"http://127.0.0.1:{port}/"

    def start_game_backend(self, port: int = 8703) -> str:
        """The game backend that grants what payments bought; returns its URL."""
        if not port_is_free(port):
            raise RuntimeError(f"port {port} is taken: is another game backend running?")
        self.spawn("game-backend", [sys.executable, "-m", "simulators.game_backend", "--port",
                                    str(port)])
        wait_for_port(port)
        return f"http://127.0.0.1:{port}"

    def start_worker(self, name: str, env: dict[str, str]) -> None:
        self.spawn(name, [sys.executable, str(PROJECT_ROOT / "worker.py")], env)

    def start_callback_receiver(self, env: dict[str, str], port: int = 8702) -> None:
        if not port_is_free(port):
            raise RuntimeError(f"port {port} is taken: is another callback receiver running?")
        env = {**env, "CB_CALLBACK_PORT": str(port),
               "CB_CALLBACK_BASE_URL": f"http://127.0.0.1:{port}"}
        self.spawn("callbacks", [sys.executable, str(PROJECT_ROOT / "callback_receiver.py")], env)
        wait_for_port(port)

    def stop(self) -> None:
        """Stops the children newest first, each before the next, so none sees its server
        vanish while it is still working."""
        for _name, child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        self.children.clear()
        if self._opensearch is not None:
            self._opensearch.close()
            self._opensearch = None

    def check_alive(self) -> None:
        for name, child in self.children:
            if child.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {child.returncode}; see {self.data_dir / (name + '.log')}"
                )
