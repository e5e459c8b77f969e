"""The management plane's Prometheus metrics, served as /metrics by the plane's admin API (mgmt/admin.py,
`ambit mgmt --admin-listen`, istiod's port 15014).

Read at scrape time from the components' own counters, so nothing on a request path pays for them: the
config store (version, loads accepted and rejected, errors in force), the relay (streams, responses,
ACK/NACK, lookups, and per node: connected, ACKed version, ACKs and NACKs), the CA (CSRs signed and
refused by reason, when the CA's certificate expires) and the bootstrap (joins, refusals by reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.promstd import register_standard

log = logging.getLogger("ambit.mgmt.metrics")


def _counter(name: str, doc: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], float(value))
    return family


class PlaneCollector(Collector):
    def __init__(
        self,
        store: Any,
        relay: Any,
        ca: Any,
        csr_counters: Callable[[], Mapping[str, int]] | None = None,
        join_counters: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.store, self.relay, self.ca = store, relay, ca
        self._csr = csr_counters or dict
        self._join = join_counters or dict

    def collect(self) -> Iterable[Metric]:
        store = self.store.counters()
        yield GaugeMetricFamily(
            "ambit_mgmt_config_version", "Config version the plane serves", value=self.store.version
        )
        yield GaugeMetricFamily(
            "ambit_mgmt_config_errors",
            "Invalid config documents or Kubernetes objects now (each skipped; its last good version stays)",
            value=len(self.store.errors),
        )
        yield CounterMetricFamily(
            "ambit_mgmt_config_rejected_documents",
            "Distinct invalid documents or objects the config source skipped since start",
            value=store.get("rejected_documents", 0),
        )
        yield _counter(
            "ambit_mgmt_config_loads",
            "Reads of the config directory by result",
            "result",
            {"accepted": store.get("loads", 0), "rejected": store.get("rejected_loads", 0)},
        )
        yield _counter("ambit_mgmt_relay_events", "Relay events by kind", "event", self.relay.counters())
        rows = self.relay.rows()
        connected = GaugeMetricFamily(
            "ambit_mgmt_node_connected", "1 while the node holds a relay stream", labels=["node"]
        )
        acked = GaugeMetricFamily(
            "ambit_mgmt_node_acked_version", "Config version the node last ACKed", labels=["node"]
        )
        acks = CounterMetricFamily("ambit_mgmt_node_acks", "Config versions the node ACKed", labels=["node"])
        nacks = CounterMetricFamily(
            "ambit_mgmt_node_nacks", "Config versions the node NACKed", labels=["node"]
        )
        for row in rows:
            node = [row["node"]]
            connected.add_metric(node, 1.0 if row["connected"] else 0.0)
            acked.add_metric(node, float(row["acked_version"]))
            acks.add_metric(node, float(row.get("acks", 0)))
            nacks.add_metric(node, float(row.get("nacks", 0)))
        yield from (connected, acked, acks, nacks)
        yield _counter(
            "ambit_mgmt_csr",
            "Certificate signing requests by result (signed, refused_*)",
            "result",
            dict(self._csr()),
        )
        yield _counter(
            "ambit_mgmt_joins", "Node joins by result (joined, refused_*)", "result", dict(self._join())
        )
        try:
            expiry = self.ca.cert.not_valid_after_utc.timestamp()
        except AttributeError:
            return
        yield GaugeMetricFamily(
            "ambit_mgmt_ca_expiry_timestamp_seconds",
            "Unix time at which the signing CA expires",
            value=expiry,
        )


class PlaneMetrics:
    """The plane's registry: standard process metrics plus the collector (served by mgmt/admin.py)."""

    def __init__(self, collector: PlaneCollector) -> None:
        self.registry = CollectorRegistry()
        register_standard(self.registry, "mgmt")
        self.registry.register(collector)
