"""The Grafana dashboard is valid JSON and queries only metrics the agent exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.connections import ConnectionClose, ConnectionRecord, Direction
from agent.observe.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "ambit-dashboard.json"


def exported_samples() -> set[str]:
    metrics = Metrics(CollectorRegistry())
    record = ConnectionRecord(1, Direction.INBOUND, "10.0.0.1", 1, "10.0.0.2", 2)
    metrics.opened(record)
    metrics.closed(ConnectionClose(record, 1, 1, 0.1))
    metrics.count_decision("ALLOW")
    metrics.count_ack(True)
    metrics.count_ack(False)
    metrics.set_relay_version(1)
    metrics.set_bpf_counters({"a": 1})
    metrics.set_engine_counters({"b": 1})
    metrics.set_cert_expiry("spiffe://td/x", 1.0)
    text = generate_latest(metrics.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_queries_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {m for e in exprs for m in re.findall(r"\b((?:istio|ambit)_[a-z_]+)\b", e)}
    exported = exported_samples()
    assert used <= exported, used - exported
    for name in ("istio_tcp_sent_bytes_total", "ambit_policy_decisions_total", "ambit_process_open_fds"):
        assert name in used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
