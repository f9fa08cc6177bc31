"""Prometheus metrics of the worker: the Temporal SDK's runtime metrics (Core's Prometheus
exporter, names prefixed ``temporal_``) and the platform's own counters, both on one endpoint.

The platform's counters go through the SDK's metric meter, so they are exported beside the SDK's
own: inside an activity ``activity.metric_meter()``, inside a workflow ``workflow.metric_meter()``
(replay-safe), elsewhere the meter of the runtime ``install_prometheus`` made. ``count`` picks the
right one.

    runtime = install_prometheus(9464)
    client = await Client.connect(address, runtime=runtime)
    # curl http://127.0.0.1:9464/metrics
"""

from __future__ import annotations

from collections.abc import Mapping

from temporalio import activity, workflow
from temporalio.common import MetricMeter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

# the platform's counters: name -> description (each carries the attributes given at ``count``)
PLATFORM_COUNTERS: dict[str, str] = {
    "carrier_credentials_rejected": "carrier answers refusing our credentials",
    "carrier_calls": "calls to carrier payment APIs, by carrier, operation and outcome",
    "charges_succeeded": "charges the carrier took, by carrier",
    "charges_failed": "charges the carrier refused or could not take, by carrier and outcome",
    "partial_payments": "charges of less than the full price (a ladder step), by carrier",
    "refunds": "refunds made, by carrier",
    "charges_refused_by_rule": "charges the country's or carrier's rules refused, by rule",
    "callbacks_received": "carrier callbacks received, by carrier",
}

_runtime: Runtime | None = None


def install_prometheus(runtime_port: int, host: str = "127.0.0.1",
                       set_default: bool = False) -> Runtime:
    """A Temporal runtime exporting its metrics for Prometheus at
    ``http://{host}:{runtime_port}/metrics``. Build the worker's Client on it
    (``Client.connect(..., runtime=runtime)``); ``set_default`` also makes it the process's
    default runtime (only before any other runtime is used)."""
    global _runtime
    runtime = Runtime(telemetry=TelemetryConfig(
        metrics=PrometheusConfig(bind_address=f"{host}:{runtime_port}")))
    if set_default:
        Runtime.set_default(runtime, error_if_already_set=True)
    _runtime = runtime
    return runtime


def platform_meter() -> MetricMeter:
    """The meter the platform's counters use where the code runs now."""
    if activity.in_activity():
        return activity.metric_meter()
    if workflow.in_workflow():
        return workflow.metric_meter()
    return (_runtime or Runtime.default()).metric_meter


def count(name: str, value: int = 1, attributes: Mapping[str, str | int | float | bool] | None = None
          ) -> None:
    """Adds ``value`` to the platform counter ``name`` (one of ``PLATFORM_COUNTERS``)."""
    description = PLATFORM_COUNTERS.get(name)
    if description is None:
        raise KeyError(f"{name!r} is not a platform counter (statistics_service.metrics)")
    platform_meter().create_counter(name, description).add(value, attributes)
