"""The Grafana dashboard: valid, queries only exported metrics, rate() only over counters, one reporter.

(tests/integration/lab/test_lab_mesh_cli.py runs every query against a real Prometheus scraping a lab.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.connections import ConnectionClose, ConnectionRecord, Direction
from agent.observe.metrics import Metrics
from mgmt.ca import CertificateAuthority
from mgmt.metrics import PlaneCollector, PlaneMetrics
from mgmt.relay_service import RelayService
from mgmt.store import ConfigStore
from tests.relay_fixtures import write_mesh

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "ambit-dashboard.json"
METRIC = re.compile(r"\b((?:istio|ambit|process)_[a-z_]+)\b")
RATE = re.compile(r"\b(?:rate|increase|irate)\(\s*((?:istio|ambit|process)_[a-z_]+)")


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _types(registry: CollectorRegistry) -> dict[str, str]:
    """Sample name -> type of its family, from the exposition's TYPE lines (a family may have no sample
    yet, e.g. per-node plane metrics before any node connected)."""
    text = generate_latest(registry).decode()
    return {
        f.name + suffix: f.type
        for f in text_string_to_metric_families(text)
        for suffix in SUFFIXES.get(f.type, ("",))
    }


def exported(tmp_path: Path) -> dict[str, str]:
    metrics = Metrics(CollectorRegistry())
    record = ConnectionRecord(1, Direction.INBOUND, "10.0.0.1", 1, "10.0.0.2", 2)
    metrics.opened(record)
    metrics.closed(ConnectionClose(record, 1, 1, 0.1))
    metrics.count_decision("ALLOW")
    metrics.count_ack(True)
    metrics.count_ack(False)
    metrics.set_relay_version(1)
    metrics.set_bpf_counters({"a": 1})
    metrics.set_engine_counters({"b": 1, "b_active": 1})
    metrics.set_cert_expiry("spiffe://td/x", 1.0)
    write_mesh(tmp_path / "config")
    store = ConfigStore(tmp_path / "config")
    store.load()
    relay = RelayService(store, "cluster.local")
    plane = PlaneMetrics(
        PlaneCollector(
            store, relay, CertificateAuthority.generate_root("cluster.local"), lambda: {"signed": 1}
        )
    )
    relay_rows = relay.rows
    relay.rows = lambda: [*relay_rows(), {"node": "n", "connected": True, "acked_version": 1}]  # type: ignore[method-assign]
    types = _types(metrics.registry) | _types(plane.registry)
    relay.close()
    return types


def _exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_exported_metrics(tmp_path: Path) -> None:
    exprs = _exprs()
    assert len(exprs) >= 25
    used = {m for e in exprs for m in METRIC.findall(e)}
    types = exported(tmp_path)
    assert used <= set(types), used - set(types)
    for name in ("istio_tcp_sent_bytes_total", "ambit_policy_decisions_total", "process_open_fds"):
        assert name in used


def test_rate_only_over_counters_and_gauges_never(tmp_path: Path) -> None:
    types = exported(tmp_path)
    for expr in _exprs():
        rated = set(RATE.findall(expr))
        for name in rated:
            assert types[name] in ("counter", "histogram"), f"rate() over {types[name]} {name}: {expr}"
        for name in set(METRIC.findall(expr)) - rated:
            assert types[name] == "gauge", f"{types[name]} {name} used without rate(): {expr}"


def test_every_istio_query_picks_one_reporter() -> None:
    # Both ends report every meshed connection: summing both counts each byte twice.
    for expr in _exprs():
        for selector in re.findall(r"istio_tcp_[a-z_]+\{([^}]*)\}", expr):
            assert re.search(r'reporter=~?"(\$reporter|destination|source)"', selector), expr
