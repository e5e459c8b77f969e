"""Metrics and the access log driven by a real TCP relay: counters move by exactly the bytes it forwarded.

The relay in this test stands in for the proxy: it accepts on loopback, connects upstream, pumps bytes
both ways counting what it really forwarded, and reports each connection through the observer contract.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.connections import ConnectionClose, ConnectionObserver, ConnectionRecord, Direction
from agent.observe.accesslog import AccessLog
from agent.observe.fanout import FanOut
from agent.observe.metrics import Metrics
from agent.observe.servers import MetricsServer, ReadinessServer
from api.promstd import build_version

SRC_ID = "spiffe://cluster.local/ns/shop/sa/web"
DST_ID = "spiffe://cluster.local/ns/shop/sa/db"


def _pump(src: socket.socket, dst: socket.socket) -> int:
    total = 0
    while chunk := src.recv(65536):
        dst.sendall(chunk)
        total += len(chunk)
    dst.shutdown(socket.SHUT_WR)  # half-close travels on, like END_STREAM in HBONE
    return total


class CountingRelay:
    """Accepts on 127.0.0.1, forwards to `upstream`, reports every connection to `observer`."""

    def __init__(self, upstream: tuple[str, int], observer: ConnectionObserver) -> None:
        self.upstream = upstream
        self.observer = observer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.closed = threading.Semaphore(0)
        self._ids = iter(range(1, 1 << 30))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client, peer), daemon=True).start()

    def _relay(self, client: socket.socket, peer: tuple[str, int]) -> None:
        start = time.time()
        upstream = socket.create_connection(self.upstream)
        record = ConnectionRecord(
            conn_id=next(self._ids),
            direction=Direction.INBOUND,
            source_ip=peer[0],
            source_port=peer[1],
            destination_ip=self.upstream[0],
            destination_port=self.upstream[1],
            source_principal=SRC_ID,
            destination_principal=DST_ID,
            source_workload="shop/web",
            destination_workload="shop/db",
            tls_version="TLSv1.3",
            start_time=start,
        )
        self.observer.opened(record)
        back: list[int] = []
        reverse = threading.Thread(target=lambda: back.append(_pump(upstream, client)))
        reverse.start()
        forward = _pump(client, upstream)
        reverse.join()
        client.close()
        upstream.close()
        self.observer.closed(ConnectionClose(record, forward, back[0], time.time() - start))
        self.closed.release()

    def close(self) -> None:
        self.listener.close()


def _reply_server() -> tuple[socket.socket, tuple[str, int]]:
    """Upstream: reads the request to EOF, answers with as many bytes as the first line asks for."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(b"r" * int(data.split(b"\n", 1)[0]))
        conn.close()

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()


def _client(address: tuple[str, int], send: int, reply: int) -> int:
    with socket.create_connection(address) as sock:
        header = f"{reply}\n".encode()
        sock.sendall(header + os.urandom(send - len(header)))
        sock.shutdown(socket.SHUT_WR)
        got = 0
        while chunk := sock.recv(65536):
            got += len(chunk)
    assert got == reply
    return send


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


@pytest.fixture
def observed(tmp_path: Path) -> Iterator[tuple[CountingRelay, Metrics, MetricsServer, AccessLog]]:
    metrics = Metrics(CollectorRegistry())
    access = AccessLog(tmp_path / "access.log")
    server = MetricsServer(metrics.registry, "127.0.0.1:0")
    server.start()
    upstream, address = _reply_server()
    relay = CountingRelay(address, FanOut(metrics, access))
    yield relay, metrics, server, access
    relay.close()
    upstream.close()
    server.stop()
    access.close()


def _run(relay: CountingRelay, sizes: list[tuple[int, int]]) -> None:
    for send, reply in sizes:
        _client(relay.address, send, reply)
    for _ in sizes:
        assert relay.closed.acquire(timeout=30)


def test_tcp_counters_move_by_exactly_the_relayed_bytes(
    observed: tuple[CountingRelay, Metrics, MetricsServer, AccessLog],
) -> None:
    relay, _, server, access = observed
    _run(relay, [(1000, 10), (70_000, 3)])
    before = scrape(server.port)
    assert total(before, "istio_tcp_received_bytes_total") == 71_000
    assert total(before, "istio_tcp_sent_bytes_total") == 13

    sizes = [(8, 200_000), (123_457, 1), (64, 64)]
    _run(relay, sizes)
    after = scrape(server.port)
    for name, expected in (
        ("istio_tcp_received_bytes_total", sum(s for s, _ in sizes)),
        ("istio_tcp_sent_bytes_total", sum(r for _, r in sizes)),
        ("istio_tcp_connections_opened_total", 3),
        ("istio_tcp_connections_closed_total", 3),
    ):
        assert total(after, name) - total(before, name) == expected, name

    labels = next(dict(ls) for (n, ls) in after if n == "istio_tcp_connections_closed_total")
    # Without a mesh snapshot only the record's own fields are known; the rest of Istio's set is "unknown".
    assert labels == {
        "reporter": "destination",
        "source_workload": "web",
        "source_canonical_service": "web",
        "source_canonical_revision": "unknown",
        "source_workload_namespace": "shop",
        "source_principal": SRC_ID,
        "source_app": "web",
        "source_version": "unknown",
        "source_cluster": "unknown",
        "destination_service": "unknown",
        "destination_service_namespace": "unknown",
        "destination_service_name": "unknown",
        "destination_workload": "db",
        "destination_canonical_service": "db",
        "destination_canonical_revision": "unknown",
        "destination_workload_namespace": "shop",
        "destination_principal": DST_ID,
        "destination_app": "db",
        "destination_version": "unknown",
        "destination_cluster": "unknown",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    durations = [
        (dict(ls), v) for (n, ls), v in after.items() if n == "ambit_tcp_connection_duration_seconds_count"
    ]
    assert durations == [({"reporter": "destination", "response_flags": "-"}, 5)]

    records = [json.loads(line) for line in access.path.read_text().splitlines()]
    assert len(records) == 5 and len({r["conn_id"] for r in records}) == 5
    by_bytes = sorted((r["bytes_sent"], r["bytes_received"]) for r in records)
    assert by_bytes == sorted([(1000, 10), (70_000, 3), *sizes])
    assert all(r["source_principal"] == SRC_ID and r["source_ip"] == "127.0.0.1" for r in records)


def test_daemon_setters_and_process_metrics(
    observed: tuple[CountingRelay, Metrics, MetricsServer, AccessLog],
) -> None:
    _, metrics, server, _ = observed
    metrics.count_decision("ALLOW")
    metrics.count_decision("deny")
    metrics.count_decision("DENY")
    metrics.set_relay_version(42)
    metrics.count_ack(True)
    metrics.count_ack(True)
    metrics.count_ack(False)
    metrics.set_bpf_counters({"redirect_outbound": 9, "skip_agent_mark": 2})
    metrics.set_engine_counters({"streams_opened": 5, "streams_active": 2})
    metrics.set_cert_expiry(SRC_ID, time.time() + 3600)
    got = scrape(server.port)

    def value(metric: str, **labels: str) -> float:
        return got[(metric, frozenset(labels.items()))]

    assert value("ambit_policy_decisions_total", action="DENY") == 2
    assert value("ambit_policy_decisions_total", action="ALLOW") == 1
    assert value("ambit_relay_config_version") == 42
    assert value("ambit_relay_acks_total") == 2 and value("ambit_relay_nacks_total") == 1
    assert value("ambit_bpf_counter_total", path="redirect_outbound") == 9
    assert value("ambit_engine_counter_total", name="streams_opened") == 5
    assert value("ambit_engine_active", name="streams_active") == 2
    assert 0 < value("ambit_certificate_expiry_seconds", identity=SRC_ID) <= 3600
    # prometheus-client's standard collectors, not hand-rolled ones.
    assert value("process_resident_memory_bytes") > 0
    assert value("process_open_fds") > 0
    assert value("process_cpu_seconds_total") > 0
    assert not [n for n, _ in got if n.startswith("ambit_process_")]
    assert value("ambit_build_info", version=build_version(), component="agent") == 1

    metrics.set_bpf_counters({"redirect_outbound": 11, "bad": "x"})  # type: ignore[dict-item]
    assert ("ambit_bpf_counter_total", frozenset({("path", "skip_agent_mark")})) not in scrape(server.port)


def test_types_and_no_created_series(
    observed: tuple[CountingRelay, Metrics, MetricsServer, AccessLog],
) -> None:
    relay, metrics, server, _ = observed
    _run(relay, [(100, 10)])
    metrics.set_bpf_counters({"redirect_outbound": 1})
    metrics.set_engine_counters({"conns_opened": 1, "conns_active": 1})
    metrics.count_decision("ALLOW")
    metrics.count_ack(True)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
        families = {f.name: f.type for f in text_string_to_metric_families(resp.read().decode())}
    for counter in (
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_sent_bytes",
        "istio_tcp_received_bytes",
        "ambit_bpf_counter",
        "ambit_engine_counter",
        "ambit_policy_decisions",
        "ambit_relay_acks",
        "process_cpu_seconds",
    ):
        assert families.get(counter) == "counter", counter
    assert families["ambit_tcp_connection_duration_seconds"] == "histogram"
    assert families["ambit_engine_active"] == "gauge"
    assert not [name for name in families if name.endswith("_created")]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
        assert "_created" not in resp.read().decode()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_readiness_follows_flag_and_callable() -> None:
    flagged = ReadinessServer("127.0.0.1:0")
    state = {"ready": False}
    computed = ReadinessServer("127.0.0.1:0", ready=lambda: state["ready"])
    flagged.start()
    computed.start()
    try:
        url = f"http://127.0.0.1:{flagged.port}/healthz/ready"
        assert _status(url) == 503
        flagged.set_ready()
        assert _status(url) == 200
        flagged.set_ready(False)
        assert _status(url) == 503
        assert _status(f"http://127.0.0.1:{flagged.port}/other") == 404

        url = f"http://127.0.0.1:{computed.port}/healthz/ready"
        assert _status(url) == 503
        state["ready"] = True
        assert _status(url) == 200
    finally:
        flagged.stop()
        computed.stop()
