"""An osmem-server process (the in-memory OpenSearch of the ``osmem-server`` package) on a
fixed local port, so a test can stop it and start it again where clients expect it."""

from __future__ import annotations

from osmem_server import OsmemServer

from tests.postgres import free_port


class OpenSearchProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: OsmemServer | None = None

    def start(self) -> None:
        # in memory: a restart comes back empty, like a cluster rebuilt from nothing
        self._server = OsmemServer.start(addr=f"127.0.0.1:{self.port}", japanese=False)
        assert self._server.url.rstrip("/") == self.url, self._server.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.process.poll() is None
