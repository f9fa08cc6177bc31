"""One adapter per carrier for the life of a worker, so HTTP connections are reused."""

from __future__ import annotations

from carriers.base import CarrierAdapter
from carriers.factory import build_adapter
from carriers.http import InteractionSink
from carriers.loader import Registry
from carriers.smpp import ReceiptSink, SmppAdapter
from models.smpp_store import SubmissionStore
from settings import Settings


class AdapterPool:
    def __init__(self, registry: Registry, settings: Settings, sink: InteractionSink,
                 smpp_store: SubmissionStore | None = None,
                 receipts: ReceiptSink | None = None) -> None:
        self._registry = registry
        self._settings = settings
        self._sink = sink
        self._smpp_store = smpp_store
        self._receipts = receipts
        self._adapters: dict[str, CarrierAdapter] = {}

    def start_sessions(self) -> None:
        """Opens the long-lived sessions (SMPP binds) now, so receipts for submissions made
        before a restart are received and matched."""
        for carrier in self._registry.carriers.values():
            if carrier.protocol == "smpp":
                adapter = self.get(carrier.id)
                assert isinstance(adapter, SmppAdapter)
                adapter.start()

    def get(self, carrier_id: str) -> CarrierAdapter:
        adapter = self._adapters.get(carrier_id)
        if adapter is None:
            config = self._registry.carriers.get(carrier_id)
            if config is None:
                raise KeyError(f"carrier {carrier_id!r} is not in the registry")
            adapter = build_adapter(config, self._settings, self._sink,
                                    smpp_store=self._smpp_store, receipts=self._receipts)
            self._adapters[carrier_id] = adapter
        return adapter

    async def aclose(self) -> None:
        for adapter in self._adapters.values():
            await adapter.aclose()
        self._adapters.clear()
