"""FanOut isolates a failing observer; AccessLog and AuditLog write one redacted JSON line per event."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.connections import ConnectionClose, ConnectionRecord, Direction
from agent.observe.accesslog import AccessLog
from agent.observe.audit import AuditLog
from agent.observe.fanout import FanOut

RECORD = ConnectionRecord(
    conn_id=7,
    direction=Direction.OUTBOUND,
    source_ip="10.244.1.2",
    source_port=40000,
    destination_ip="10.244.2.2",
    destination_port=8080,
    source_principal="spiffe://cluster.local/ns/a/sa/x",
    destination_principal="spiffe://cluster.local/ns/b/sa/y",
    source_workload="a/x",
    destination_workload="b/y",
    policy="b/allow-x",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_128_GCM_SHA256",
    peer_cert_sha256="ab" * 32,
    start_time=time.time(),
)


class Broken:
    def opened(self, record: ConnectionRecord) -> None:
        raise RuntimeError("boom")

    def closed(self, close: ConnectionClose) -> None:
        raise RuntimeError("boom")


class Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []

    def opened(self, record: ConnectionRecord) -> None:
        self.events.append(record)

    def closed(self, close: ConnectionClose) -> None:
        self.events.append(close)


def test_fanout_isolates_failures() -> None:
    recorder = Recorder()
    fan = FanOut(Broken(), recorder)
    close = ConnectionClose(RECORD, 10, 20, 0.5)
    fan.opened(RECORD)
    fan.closed(close)
    assert recorder.events == [RECORD, close]
    assert fan.errors == {"Broken": 2}


def test_access_log_records(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "access.log", log_start=True)
    log.opened(RECORD)
    log.closed(ConnectionClose(RECORD, 123, 456, 0.25, response_flags="-"))
    log.close()
    opened, closed = (json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines())
    assert opened["event"] == "open" and opened["conn_id"] == 7
    assert closed["event"] == "close"
    assert (closed["bytes_sent"], closed["bytes_received"]) == (123, 456)
    assert closed["duration_ms"] == 250.0
    assert closed["source_principal"] == RECORD.source_principal
    assert closed["tls_version"] == "TLSv1.3" and closed["peer_cert_sha256"] == "ab" * 32
    assert closed["start"].endswith("Z") and closed["end"] >= closed["start"]


def test_access_log_without_start_records(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "access.log")
    log.opened(RECORD)
    log.closed(ConnectionClose(RECORD, 1, 2, 0.1))
    assert len((tmp_path / "access.log").read_text().splitlines()) == 1


def test_audit_log_redacts(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    audit.record("config_applied", version=3)
    audit.record("csr_refused", node="node-1", join_token="t0k3n", detail="-----BEGIN PRIVATE KEY-----\nx")
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["config_applied", "csr_refused"]
    assert lines[0]["version"] == 3
    audit.record("decision", **{"event": "authorization", "decision": "deny", "time": 5})
    last = json.loads((tmp_path / "audit.log").read_text().splitlines()[-1])
    assert (last["event"], last["event_"], last["decision"], last["time_"]) == (
        "decision",
        "authorization",
        "deny",
        5,
    )
    text = (tmp_path / "audit.log").read_text()
    assert "t0k3n" not in text and "PRIVATE KEY" not in text
