"""What every ambit process exports to Prometheus, agent and plane alike (mgmt/ must not import agent/).

prometheus-client's own process and platform collectors (process_cpu_seconds_total,
process_resident_memory_bytes, process_open_fds, ..., python_info) and `ambit_build_info{version,
component}` = 1, the usual form of build information. `<name>_created` series are turned off: Istio
exports none, and each one doubles the series a scrape stores.
"""

from __future__ import annotations

from prometheus_client import PLATFORM_COLLECTOR, CollectorRegistry, Gauge, ProcessCollector
from prometheus_client import disable_created_metrics as _disable_created_metrics

_disable_created_metrics()


def build_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ambit")
    except PackageNotFoundError:  # a checkout that was never installed
        return "0+unknown"


def register_standard(registry: CollectorRegistry, component: str) -> None:
    ProcessCollector(registry=registry)
    registry.register(PLATFORM_COLLECTOR)
    info = Gauge(
        "ambit_build_info",
        "ambit build: 1, labelled with the version and the component",
        ["version", "component"],
        registry=registry,
    )
    info.labels(build_version(), component).set(1)
