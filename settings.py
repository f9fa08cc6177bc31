"""Process settings, read from the environment (prefix ``CB_``) and an optional ``.env`` file."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CB_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # names this deployment inside every idempotency key we send: two environments on one
    # merchant account (or a restored database) can never replay each other's keys
    deployment_id: str = Field(default="dev", pattern=r"^[a-z0-9]{1,12}$")

    database_url: str = f"sqlite:///{PROJECT_ROOT / '.data' / 'billing.db'}"

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "subscription-billing"

    # Addresses that registry endpoints refer to by name, e.g. "{sim}/fr-azur/payment/v1".
    simulator_urls: dict[str, str] = Field(
        default_factory=lambda: {"sim": "http://127.0.0.1:8701", "smpp": "127.0.0.1:2775"}
    )
    # Carrier credentials by the registry's secret reference; never written to the registry.
    carrier_secrets: dict[str, SecretStr] = Field(default_factory=dict)

    # where carriers call us back (the callback receiver), as the carriers see it
    callback_base_url: str = "http://127.0.0.1:8702"
    callback_port: int = 8702
    # the address the receiver listens on (0.0.0.0 in a pod, behind its Service)
    callback_host: str = "127.0.0.1"

    carrier_timeout_seconds: float = 10.0
    max_concurrent_activities: int = 200
    # each carrier's own queue: its slots, and how many long polls wait on it
    max_concurrent_activities_per_carrier: int = 20
    activity_pollers_per_carrier: int = 2
    max_concurrent_workflow_tasks: int = 200
    # new subscriptions' charges start as local activities (carriers/gate.py; the bench runs
    # with it on); the share of each carrier's rate limit all workers' local calls may take
    # together (0: every charge goes through the carrier's queue), and how many worker
    # processes split it
    local_charges: bool = False
    local_call_share: float = 0.5
    worker_processes: int = 1
    max_concurrent_local_activities: int = 200
    # workflows kept in memory between their tasks (a workflow not cached replays its history)
    max_cached_workflows: int = 2000
    gil_switch_interval_seconds: float = 0.001
    # what the worker built at start (registry, catalogue, SQLAlchemy, the SDK) is moved out of
    # the garbage collector's sight: its full collections, which stop every charge in flight,
    # then scan only what changes (measured: pauses of 100-580 ms every ~20 s without it)
    gc_freeze_after_start: bool = True
    # a youngest generation this large lets a charge's short-lived objects die by reference
    # count before a collection promotes them; fewer promoted, fewer full collections
    gc_thresholds: tuple[int, int, int] = (50_000, 20, 10)

    opensearch_url: str | None = None
    # payload encryption (codec/): key id -> base64 AES key (16/24/32 bytes); new payloads use
    # codec_current_key (may be unset with one key); no keys: payloads stored in plain text
    codec_keys: dict[str, SecretStr] = Field(default_factory=dict)
    codec_current_key: str | None = None

    # keys the MSISDN hash in indexed documents: set a real secret in production, and keep it
    # (a new key splits every subscriber's history in two)
    trace_hash_key: SecretStr | None = None

    # the worker's Prometheus endpoint (SDK runtime metrics and the platform's counters)
    metrics_port: int | None = None

    # bill subscriptions under their country's, carrier's and product's rules (rules/data)
    apply_rules: bool = True

    # the game backend that grants what a payment bought (simulators/game_backend.py)
    game_backend_url: str = "http://127.0.0.1:8703"
    game_backend_token: SecretStr = SecretStr("dev-game-backend-token")
    game_backend_timeout_seconds: float = 5.0

    # the SMPP carrier entry whose SMSC sends the platform's free notices (welcome, receipt,
    # opt-in code) to subscribers of carriers that have no SMSC of their own; None: none
    notice_carrier_id: str | None = None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def venv_binary(name: str) -> str:
    """Path of a console binary installed beside this interpreter (temporal, temporal-test-server)."""
    path = Path(sys.prefix) / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path}; run `make install`")
    return str(path)
