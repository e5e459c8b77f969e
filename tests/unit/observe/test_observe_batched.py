"""Within an event drain (`api.jsonlog.batched`) the connection metrics are deferred and applied once per
label set, and the access log writes lines it assembles from cached encoded parts: after a burst of N
connections every count is exact, and every line is the JSON `JsonLog.write` would have written."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent.connections import ConnectionClose, ConnectionRecord
from agent.observe import accesslog
from agent.observe.accesslog import AccessLog
from agent.observe.fanout import FanOut
from agent.observe.metrics import Metrics
from api.jsonlog import JsonLog, batched, utc_iso
from tests.unit.observe.test_observe_fanout import RECORD

BASE = RECORD.derive(conn_id=0, source_port=0, policy="", start_time=0.0)  # per connection: derived below
OTHER = BASE.derive(destination_ip="10.244.2.3", destination_workload="b/z")


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_a_burst_in_one_drain_counts_every_connection_exactly() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    n = 50
    with batched():
        for i in range(1, n + 1):
            record = (BASE if i % 2 else OTHER).derive(conn_id=i, source_port=40000 + i)
            metrics.opened(record)
            metrics.closed(ConnectionClose(record, 10 * i, i, 0.01, "-" if i % 5 else "UR"))
        # deferred to the drain's end: nothing applied yet (histograms are observed at once)
        assert _value(registry, "istio_tcp_connections_opened_total") == 0
    assert _value(registry, "istio_tcp_connections_opened_total") == n
    assert _value(registry, "istio_tcp_connections_closed_total") == n
    assert _value(registry, "istio_tcp_connections_closed_total", response_flags="UR") == n // 5
    assert _value(registry, "istio_tcp_connections_opened_total", destination_workload="z") == n // 2
    # Istio's server-side view: received is what the client sent (bytes_sent), sent what came back.
    assert _value(registry, "istio_tcp_received_bytes_total") == sum(10 * i for i in range(1, n + 1))
    assert _value(registry, "istio_tcp_sent_bytes_total") == sum(range(1, n + 1))
    assert _value(registry, "ambit_tcp_connections_open") == 0
    assert _value(registry, "ambit_tcp_connection_duration_seconds_count") == n


def test_open_connections_are_a_level_across_drains() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    records = [BASE.derive(conn_id=i) for i in range(1, 11)]
    with batched():
        for record in records:
            metrics.opened(record)
    assert _value(registry, "ambit_tcp_connections_open") == 10
    with batched():
        for record in records[:4]:
            metrics.closed(ConnectionClose(record, 1, 1, 0.5))
    assert _value(registry, "ambit_tcp_connections_open") == 6
    metrics.closed(ConnectionClose(records[4], 1, 1, 0.5))  # outside a drain: applied at once
    assert _value(registry, "ambit_tcp_connections_open") == 5
    assert _value(registry, "istio_tcp_connections_closed_total") == 5


def _expected_close(close: ConnectionClose, line: dict[str, object]) -> dict[str, object]:
    """What the access log wrote before it assembled lines: the whole record through JsonLog.write."""
    r = close.record
    fields = accesslog._record_fields(r)  # the field mapping the log always had
    return {
        "event": "close", "start": utc_iso(r.start_time) if r.start_time else line["start"],
        "end": line["end"],
        "duration_ms": round(close.duration_s * 1000, 3), **fields, "bytes_sent": close.bytes_sent,
        "bytes_received": close.bytes_received, "response_flags": close.response_flags,
        "deny_reason": close.error if close.response_flags == "DENY" else "", "error": close.error,
    }  # fmt: skip


def test_access_log_lines_are_the_records_json(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "access.log")
    key_text = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----"
    closes = [
        ConnectionClose(BASE.derive(conn_id=1, source_port=40001, start_time=time.time()), 5, 7, 0.0125),
        ConnectionClose(OTHER.derive(conn_id=2, start_time=time.time()), 0, 0, 1.5, "DENY", "denied by b/p"),
        ConnectionClose(BASE.derive(conn_id=3, policy='ns/\u00e9t\u00e9 "q"'), 1, 2, 0.001, "UF", key_text),
    ]
    with batched():
        for close in closes:
            log.closed(close)
    lines = (tmp_path / "access.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(closes)
    for close, text in zip(closes, lines, strict=True):
        line = json.loads(text)
        want = _expected_close(close, line)
        if close.error == key_text:  # never a secret in a file: redacted as JsonLog.write redacts
            want["error"] = "<redacted>"
        assert list(line) == list(want) and line == want
    # the same bytes JsonLog.write produces for that object
    plain = JsonLog(tmp_path / "plain.log")
    plain.write(json.loads(lines[1]))
    assert (tmp_path / "plain.log").read_text(encoding="utf-8").splitlines() == [lines[1]]


def test_access_log_caches_are_bounded(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "access.log")
    for i in range(accesslog.PARTS_CACHE_MAX + 10):
        record = BASE.derive(conn_id=i, destination_port=1 + i)
        log.closed(ConnectionClose(record, 1, 1, 0.1, "-", f"error {i % (accesslog.ENDS_CACHE_MAX + 5)}"))
    assert len(log._parts_cache) <= accesslog.PARTS_CACHE_MAX
    assert len(log._ends_cache) <= accesslog.ENDS_CACHE_MAX
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == accesslog.PARTS_CACHE_MAX + 10
    assert json.loads(lines[-1])["destination_port"] == accesslog.PARTS_CACHE_MAX + 10


def test_a_failing_observer_does_not_lose_the_drains_metrics() -> None:
    class Broken:
        def opened(self, record: ConnectionRecord) -> None:
            raise RuntimeError("boom")

        def closed(self, close: ConnectionClose) -> None:
            raise RuntimeError("boom")

    registry = CollectorRegistry()
    fan = FanOut(Broken(), Metrics(registry))
    with batched():
        for i in range(1, 6):
            record = BASE.derive(conn_id=i)
            fan.opened(record)
            fan.closed(ConnectionClose(record, 1, 1, 0.1))
    assert _value(registry, "istio_tcp_connections_closed_total") == 5
    assert fan.errors == {"Broken": 10}


def test_derive_is_dataclasses_replace() -> None:
    changed = BASE.derive(conn_id=9, source_port=4, trace_id="ab" * 16)
    assert changed == dataclasses.replace(BASE, conn_id=9, source_port=4, trace_id="ab" * 16)
    assert BASE.conn_id == 0  # the template is untouched
    with pytest.raises(TypeError, match="not_a_field"):
        BASE.derive(not_a_field=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.conn_id = 1  # type: ignore[misc]
