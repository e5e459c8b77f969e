"""The agent's Prometheus metrics: Istio's TCP metrics per connection plus ambit's own.

Istio names and labels are kept so existing Istio/Kiali dashboards work. Istio counts from the server's
point of view: istio_tcp_received_bytes_total is what the client sent (the request direction) and
istio_tcp_sent_bytes_total what the server sent back, i.e. our ConnectionClose.bytes_sent and
.bytes_received respectively. Bytes are counted when the proxy reports the close.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.connections import ConnectionClose, ConnectionRecord, Direction

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
ISTIO_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "connection_security_policy",
    "response_flags",
)


def _split_uid(uid: str) -> tuple[str, str]:
    """ "<ns>/<name>" -> (name, ns); Istio reports "unknown" for what it does not know."""
    ns, sep, name = uid.partition("/")
    if not sep:
        return (uid or UNKNOWN), UNKNOWN
    return (name or UNKNOWN), (ns or UNKNOWN)


def istio_labels(record: ConnectionRecord, response_flags: str = "-") -> dict[str, str]:
    src_name, src_ns = _split_uid(record.source_workload)
    dst_name, dst_ns = _split_uid(record.destination_workload)
    return {
        # ztunnel reports inbound connections as the destination, everything it originates as the source.
        "reporter": "destination" if record.direction is Direction.INBOUND else "source",
        "source_workload": src_name,
        "source_workload_namespace": src_ns,
        "source_principal": record.source_principal or UNKNOWN,
        "destination_workload": dst_name,
        "destination_workload_namespace": dst_ns,
        "destination_principal": record.destination_principal or UNKNOWN,
        "connection_security_policy": record.security_policy or UNKNOWN,
        "response_flags": response_flags or "-",
    }


class _Snapshots(Collector):
    """Values the daemon sets as whole snapshots (BPF and engine counters, cert expiry) and process stats.

    Collected at scrape time, so a counter that disappears from a snapshot disappears from /metrics.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bpf: dict[str, float] = {}
        self._engine: dict[str, float] = {}
        self._cert_expiry: dict[str, float] = {}
        self._process = psutil.Process()

    def set_bpf(self, counters: Mapping[str, int]) -> None:
        clean = _numeric(counters, "BPF")
        with self._lock:
            self._bpf = clean

    def set_engine(self, counters: Mapping[str, int]) -> None:
        clean = _numeric(counters, "engine")
        with self._lock:
            self._engine = clean

    def set_cert_expiry(self, identity: str, not_after: float) -> None:
        with self._lock:
            self._cert_expiry[identity] = not_after

    def drop_cert(self, identity: str) -> None:
        with self._lock:
            self._cert_expiry.pop(identity, None)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            bpf, engine, certs = dict(self._bpf), dict(self._engine), dict(self._cert_expiry)
        yield _labelled_gauge("ambit_bpf_counter", "BPF datapath counters by path", "path", bpf)
        yield _labelled_gauge("ambit_engine_counter", "C engine counters by name", "name", engine)
        now = time.time()
        yield _labelled_gauge(
            "ambit_certificate_expiry_seconds",
            "Seconds until the workload or node certificate expires (negative: expired)",
            "identity",
            {k: v - now for k, v in certs.items()},
        )
        yield _labelled_gauge(
            "ambit_certificate_expiry_timestamp_seconds",
            "Unix time at which the certificate expires",
            "identity",
            certs,
        )
        yield from self._process_metrics()

    def _process_metrics(self) -> Iterable[Metric]:
        try:
            with self._process.oneshot():
                cpu = self._process.cpu_times()
                rss = self._process.memory_info().rss
                fds = self._process.num_fds()
                threads = self._process.num_threads()
        except psutil.Error:
            return
        c = CounterMetricFamily("ambit_process_cpu_seconds", "CPU time of the agent process (user+system)")
        c.add_metric([], cpu.user + cpu.system)
        yield c
        yield GaugeMetricFamily("ambit_process_resident_memory_bytes", "Resident memory", value=rss)
        yield GaugeMetricFamily("ambit_process_open_fds", "Open file descriptors", value=fds)
        yield GaugeMetricFamily("ambit_process_threads", "Threads of the agent process", value=threads)


def _numeric(counters: Mapping[str, Any], what: str) -> dict[str, float]:
    """Only numbers reach the exposition: one bad value must not break every scrape."""
    clean = {}
    for name, value in counters.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            clean[str(name)] = float(value)
        else:
            log.warning("ignoring non-numeric %s counter %s=%r", what, name, value)
    return clean


def _labelled_gauge(name: str, doc: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], float(value))
    return family


class Metrics:
    """ConnectionObserver that feeds Istio's TCP metrics, plus the setters the daemon calls."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", ISTIO_LABELS, registry=registry
        )
        self._closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", ISTIO_LABELS, registry=registry
        )
        self._sent = Counter(
            "istio_tcp_sent_bytes",
            "Bytes sent by the server side of TCP connections (the response direction)",
            ISTIO_LABELS,
            registry=registry,
        )
        self._received = Counter(
            "istio_tcp_received_bytes",
            "Bytes received by the server side of TCP connections (the request direction)",
            ISTIO_LABELS,
            registry=registry,
        )
        self._decisions = Counter(
            "ambit_policy_decisions", "Authorization decisions by action", ["action"], registry=registry
        )
        self._relay_version = Gauge(
            "ambit_relay_config_version", "Config version last applied from the relay", registry=registry
        )
        self._acks = Counter("ambit_relay_acks", "Config versions ACKed to the relay", registry=registry)
        self._nacks = Counter("ambit_relay_nacks", "Config versions NACKed to the relay", registry=registry)
        self._snapshots = _Snapshots()
        registry.register(self._snapshots)

    # ConnectionObserver
    def opened(self, record: ConnectionRecord) -> None:
        self._opened.labels(**istio_labels(record)).inc()

    def closed(self, close: ConnectionClose) -> None:
        labels = istio_labels(close.record, close.response_flags)
        self._closed.labels(**labels).inc()
        if close.bytes_received > 0:
            self._sent.labels(**labels).inc(close.bytes_received)
        if close.bytes_sent > 0:
            self._received.labels(**labels).inc(close.bytes_sent)

    # Setters for the daemon
    def count_decision(self, action: str | enum.Enum) -> None:
        value = action.value if isinstance(action, enum.Enum) else action
        self._decisions.labels(action=str(value).upper()).inc()

    def set_cert_expiry(self, identity: str, not_after: float) -> None:
        self._snapshots.set_cert_expiry(identity, not_after)

    def drop_cert(self, identity: str) -> None:
        self._snapshots.drop_cert(identity)

    def set_relay_version(self, version: int) -> None:
        self._relay_version.set(version)

    def count_ack(self, ok: bool) -> None:
        (self._acks if ok else self._nacks).inc()

    def set_bpf_counters(self, counters: Mapping[str, int]) -> None:
        self._snapshots.set_bpf(counters)

    def set_engine_counters(self, counters: Mapping[str, int]) -> None:
        self._snapshots.set_engine(counters)
