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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.connections import ConnectionClose, ConnectionRecord, Direction
from api.jsonlog import defer
from api.promstd import register_standard

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
# ztunnel's label set for its TCP metrics, in its order (Istio's standard metrics, TCP part).
ISTIO_LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
DEFAULT_CLUSTER = "Kubernetes"  # Istio's default cluster ID
SERVICE_DOMAIN = "svc.cluster.local"
# Istio derives the canonical service and revision from these labels, first present wins.
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
# Connection lifetimes: from a health check's milliseconds to a long-lived stream's hour.
_OPENED, _OPEN, _CLOSED, _SENT, _RECEIVED = range(5)  # a label set's deferred counts (Metrics._pending)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)


def _split_uid(uid: str) -> tuple[str, str]:
    """ "<ns>/<name>" -> (name, ns); Istio reports "unknown" for what it does not know."""
    ns, sep, name = uid.partition("/")
    if not sep:
        return (uid or UNKNOWN), UNKNOWN
    return (name or UNKNOWN), (ns or UNKNOWN)


def _first_label(labels: Mapping[str, str], keys: tuple[str, ...], default: str) -> str:
    return next((labels[k] for k in keys if labels.get(k)), default)


def _namespace_of(principal: str) -> str:
    """The namespace a SPIFFE workload ID names (spiffe://TD/ns/NS/sa/SA), else unknown."""
    parts = principal.split("/")
    if len(parts) >= 7 and parts[3] == "ns" and parts[5] == "sa":
        return parts[4] or UNKNOWN
    return UNKNOWN


def _workload_labels(side: str, uid: str, workload: Any, cluster: str, principal: str) -> dict[str, str]:
    name, ns = _split_uid(uid or (workload.uid if workload is not None else ""))
    if ns == UNKNOWN:
        # A peer this node never looked up (the client of an inbound connection): its verified identity
        # still names its namespace, as ztunnel derives it from the peer certificate.
        ns = _namespace_of(principal)
    if workload is None:
        canonical, revision, where = name, UNKNOWN, UNKNOWN
    else:
        labels = dict(workload.labels)
        canonical = _first_label(labels, CANONICAL_NAME_LABELS, workload.name)
        revision = _first_label(labels, CANONICAL_REVISION_LABELS, "latest")
        where = cluster
    return {
        f"{side}_workload": name,
        f"{side}_canonical_service": canonical,
        f"{side}_canonical_revision": revision,
        f"{side}_workload_namespace": ns,
        # As ztunnel: app and version are the canonical service and revision.
        f"{side}_app": canonical,
        f"{side}_version": revision,
        f"{side}_cluster": where,
    }


def _first_selecting(snapshot: Any, workload: Any) -> Any:
    return next((s for _, s in sorted(snapshot.services.items()) if s.selects(workload)), None)


class _SelectingService:
    """The first service selecting a workload, remembered per snapshot (snapshots are immutable), so a
    mesh with many services costs one scan per workload and config version, not one per connection."""

    def __init__(self) -> None:
        self._snapshot: Any = None
        self._by_uid: dict[str, Any] = {}

    def __call__(self, snapshot: Any, workload: Any) -> Any:
        if snapshot is not self._snapshot:
            self._snapshot, self._by_uid = snapshot, {}
        if workload.uid not in self._by_uid:
            self._by_uid[workload.uid] = _first_selecting(snapshot, workload)
        return self._by_uid[workload.uid]


def _service_labels(
    record: ConnectionRecord, snapshot: Any, workload: Any, selecting: Callable[[Any, Any], Any]
) -> dict[str, str]:
    """The destination service: the one whose address the client dialled, else one selecting the pod."""
    service = None
    if snapshot is not None:
        service = snapshot.service_by_ip(record.destination_ip)
        if service is None and workload is not None:
            service = selecting(snapshot, workload)
    if service is None:
        return dict.fromkeys(
            ("destination_service", "destination_service_namespace", "destination_service_name"), UNKNOWN
        )
    name, ns = _split_uid(service.uid)
    return {
        "destination_service": f"{name}.{ns}.{SERVICE_DOMAIN}",
        "destination_service_namespace": ns,
        "destination_service_name": name,
    }


def _lookup(snapshot: Any, uid: str, ip: str) -> Any:
    if snapshot is None:
        return None
    return snapshot.workloads.get(uid) if uid else snapshot.workload_by_ip(ip)


def istio_labels(
    record: ConnectionRecord,
    response_flags: str = "-",
    snapshot: Any = None,
    cluster: str = DEFAULT_CLUSTER,
    selecting: Callable[[Any, Any], Any] = _first_selecting,
) -> dict[str, str]:
    """Istio's TCP labels of a connection; `snapshot` (the node's MeshSnapshot) adds what the record does
    not carry: workload labels (canonical service, revision) and the destination service."""
    src = _lookup(snapshot, record.source_workload, record.source_ip)
    dst = _lookup(snapshot, record.destination_workload, record.destination_ip)
    labels = {
        # ztunnel reports inbound connections as the destination, everything it originates as the source.
        "reporter": "destination" if record.direction is Direction.INBOUND else "source",
        **_workload_labels("source", record.source_workload, src, cluster, record.source_principal),
        "source_principal": record.source_principal or UNKNOWN,
        **_service_labels(record, snapshot, dst, selecting),
        **_workload_labels(
            "destination", record.destination_workload, dst, cluster, record.destination_principal
        ),
        "destination_principal": record.destination_principal or UNKNOWN,
        "request_protocol": "tcp",
        "response_flags": response_flags or "-",
        "connection_security_policy": record.security_policy or UNKNOWN,
    }
    return {name: labels[name] for name in ISTIO_LABELS}


class _Snapshots(Collector):
    """Values the daemon sets as whole snapshots (BPF and engine counters, cert expiry).

    Collected at scrape time, so a counter that disappears from a snapshot disappears from /metrics. The
    BPF and engine counters only grow (until the agent restarts), so they are exported as counters; the
    engine's `*_active` values are levels, exported as gauges.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bpf: dict[str, float] = {}
        self._engine: dict[str, float] = {}
        self._cert_expiry: dict[str, float] = {}

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
        yield _labelled_counter("ambit_bpf_counter", "BPF datapath counters by path", "path", bpf)
        levels = {k: v for k, v in engine.items() if k.endswith("_active")}
        totals = {k: v for k, v in engine.items() if k not in levels}
        yield _labelled_counter("ambit_engine_counter", "C engine counters by name", "name", totals)
        yield _labelled_gauge("ambit_engine_active", "C engine live objects by kind", "name", levels)
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


def _numeric(counters: Mapping[str, Any], what: str) -> dict[str, float]:
    """Only numbers reach the exposition: one bad value must not break every scrape."""
    clean = {}
    for name, value in counters.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            clean[str(name)] = float(value)
        else:
            log.warning("ignoring non-numeric %s counter %s=%r", what, name, value)
    return clean


def _labelled_counter(name: str, doc: str, label: str, values: Mapping[str, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], float(value))
    return family


def _labelled_gauge(name: str, doc: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], float(value))
    return family


LABEL_CACHE_MAX = 4096  # distinct label sets remembered per snapshot (then forgotten all at once)


class _Children:
    """One label set and the metric children resolved for it (prometheus_client's `labels()` per call
    validates and joins every value)."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self._children: dict[int, Any] = {}

    def child(self, metric: Any, names: tuple[str, ...] | None = None) -> Any:
        found = self._children.get(id(metric))
        if found is None:
            found = metric.labels(*(self.labels[n] for n in names)) if names else metric.labels(**self.labels)
            self._children[id(metric)] = found
        return found


class Metrics:
    """ConnectionObserver that feeds Istio's TCP metrics, plus the setters the daemon calls."""

    def __init__(
        self,
        registry: CollectorRegistry,
        snapshot: Callable[[], Any] | None = None,
        cluster: str = DEFAULT_CLUSTER,
        component: str = "agent",
    ) -> None:
        self.registry = registry
        self._snapshot = snapshot or (lambda: None)
        self._selecting = _SelectingService()
        # Labels and their metric children per (record identity, flags), per snapshot: connections between
        # the same two pods repeat them, and resolving 23 labels per record was a third of its cost.
        self._label_cache: dict[tuple[Any, ...], _Children] = {}
        self._label_snapshot: Any = None
        self._label_lock = threading.Lock()
        self.cluster = cluster
        register_standard(registry, component)
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
        # A level, so dashboards need no opened-minus-closed arithmetic (wrong across counter resets and
        # label sets: closes carry response flags, opens do not).
        self._open = Gauge(
            "ambit_tcp_connections_open", "Proxied TCP connections open now", ["reporter"], registry=registry
        )
        self._open_ids: dict[int, _Children] = {}  # conn_id -> its labels; as large as the proxy's table
        # Counts deferred within an event drain (api.jsonlog.batched), per label set (_OPENED.._RECEIVED):
        # a drain of N connections between the same pods makes one inc per metric, not N.
        self._pending: dict[_Children, list[int]] = {}
        self._conn_lock = threading.Lock()  # _open_ids and _pending
        self._duration = Histogram(
            "ambit_tcp_connection_duration_seconds",
            "Lifetime of proxied TCP connections, observed when they close",
            ["reporter", "response_flags"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._decisions = Counter(
            "ambit_policy_decisions", "Authorization decisions by action", ["action"], registry=registry
        )
        self._decision_children: dict[str | enum.Enum, Any] = {}
        self._relay_version = Gauge(
            "ambit_relay_config_version", "Config version last applied from the relay", registry=registry
        )
        self._acks = Counter("ambit_relay_acks", "Config versions ACKed to the relay", registry=registry)
        self._nacks = Counter("ambit_relay_nacks", "Config versions NACKed to the relay", registry=registry)
        self._snapshots = _Snapshots()
        registry.register(self._snapshots)

    # ConnectionObserver
    def _labels(self, record: ConnectionRecord, response_flags: str = "-") -> _Children:
        try:
            snapshot = self._snapshot()
        except Exception:  # labels from the record alone beat a lost count
            log.exception("metrics: reading the mesh snapshot failed")
            snapshot = None
        # Every record field istio_labels reads (the source IP only matters without a source workload).
        key = (
            record.direction, record.source_workload, "" if record.source_workload else record.source_ip,
            record.destination_workload, record.destination_ip, record.source_principal,
            record.destination_principal, record.security_policy, response_flags,
        )  # fmt: skip
        with self._label_lock:
            if snapshot is not self._label_snapshot:
                self._label_snapshot = snapshot
                self._label_cache.clear()
            hit = self._label_cache.get(key)
        if hit is None:
            hit = _Children(istio_labels(record, response_flags, snapshot, self.cluster, self._selecting))
            with self._label_lock:
                if len(self._label_cache) >= LABEL_CACHE_MAX:
                    self._label_cache.clear()
                self._label_cache[key] = hit
        return hit

    def opened(self, record: ConnectionRecord) -> None:
        labels = self._labels(record)
        deferred = defer(self)  # in an event drain: one inc per label set at its end (flush)
        with self._conn_lock:
            counted = record.conn_id not in self._open_ids
            if counted:
                self._open_ids[record.conn_id] = labels
            if deferred:
                acc = self._pending.get(labels) or self._pending.setdefault(labels, [0, 0, 0, 0, 0])
                acc[_OPENED] += 1
                acc[_OPEN] += counted
                return
        labels.child(self._opened).inc()
        if counted:
            labels.child(self._open, ("reporter",)).inc()

    def closed(self, close: ConnectionClose) -> None:
        deferred = defer(self)
        with self._conn_lock:
            opened = self._open_ids.pop(close.record.conn_id, None)
        # A clean close has the labels its open had (the record is the same, flags "-"): no second lookup.
        labels = opened if opened is not None and close.response_flags == "-" else None
        if labels is None:
            labels = self._labels(close.record, close.response_flags)
        labels.child(self._duration, ("reporter", "response_flags")).observe(max(0.0, close.duration_s))
        sent, received = max(0, close.bytes_received), max(0, close.bytes_sent)  # Istio's server-side view
        if deferred:
            with self._conn_lock:
                acc = self._pending.get(labels) or self._pending.setdefault(labels, [0, 0, 0, 0, 0])
                acc[_CLOSED] += 1
                acc[_SENT] += sent
                acc[_RECEIVED] += received
                if opened is not None:  # the gauge child it was counted in when it opened
                    was = self._pending.get(opened) or self._pending.setdefault(opened, [0, 0, 0, 0, 0])
                    was[_OPEN] -= 1
            return
        self._apply(labels, [0, 0, 1, sent, received])
        if opened is not None:
            opened.child(self._open, ("reporter",)).dec()

    def flush(self) -> None:
        """Apply the updates deferred in an event drain (`api.jsonlog.batched`): one per label set."""
        with self._conn_lock:
            pending, self._pending = self._pending, {}
        for labels, acc in pending.items():
            self._apply(labels, acc)

    def _apply(self, labels: _Children, acc: list[int]) -> None:
        for index, metric in ((_OPENED, self._opened), (_CLOSED, self._closed), (_SENT, self._sent),
                              (_RECEIVED, self._received)):  # fmt: skip
            if acc[index]:
                labels.child(metric).inc(acc[index])
        if acc[_OPEN]:
            labels.child(self._open, ("reporter",)).inc(acc[_OPEN])

    # Setters for the daemon
    def count_decision(self, action: str | enum.Enum) -> None:
        child = self._decision_children.get(action)  # per inbound connection: labels() validates each time
        if child is None:
            value = action.value if isinstance(action, enum.Enum) else action
            child = self._decisions.labels(action=str(value).upper())
            if len(self._decision_children) < 64:  # actions are a handful; anything else is not cached
                self._decision_children[action] = child
        child.inc()

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
