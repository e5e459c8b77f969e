"""The gateway over real sockets: corpus rows replayed byte for byte through a WAF route, routing by host,
path, headers and method, limits, audit records and counters, TLS with SNI, and config refusals."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.server import GatewayServer, ServerOptions
from tests.gateway_corpus import SAMPLE, Backend, exchange, load_rows, replay, status_of
from tests.gateway_fixtures import (
    closed_port,
    free_port,
    gateway_doc,
    policy_doc,
    route_doc,
    running_gateway,
    service_doc,
    tls_material,
    write_config,
)

GET = b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: t\r\nAccept: */*\r\nConnection: close\r\n\r\n"


def get(port: int, path: bytes = b"/", host: bytes = b"shop.example", extra: bytes = b"") -> bytes:
    return exchange(
        port,
        (GET % (path, host)).replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n") if extra else GET % (path, host),
    )


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[Backend, Backend]]:
    a, b = Backend(), Backend()
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def edge(
    tmp_path_factory: pytest.TempPathFactory, backends: tuple[Backend, Backend]
) -> Iterator[GatewayServer]:
    a, b = backends
    docs = [
        gateway_doc(
            [
                {"name": "http", "port": free_port(), "protocol": "HTTP", "hostname": "*.example"},
                {"name": "corpus", "port": free_port(), "protocol": "HTTP"},
            ]
        ),
        service_doc("shop", a.port),
        service_doc("api", b.port),
        route_doc("shop", "shop", hostnames=["shop.example"]),
        route_doc(
            "api",
            "api",
            hostnames=["shop.example"],
            matches=[
                {"path": {"type": "PathPrefix", "value": "/api"}},
                {
                    "path": {"type": "Exact", "value": "/admin"},
                    "headers": [{"name": "X-Team", "value": "ops"}],
                    "method": "POST",
                },
            ],
        ),
        route_doc("detect", "shop", hostnames=["*.detect.example"]),
        route_doc("corpus", "shop", section="corpus"),
        policy_doc("strict", "Gateway", "edge", requestBodyLimit=4096),
        policy_doc("watch", "HTTPRoute", "detect", mode="DetectOnly"),
    ]
    directory = write_config(tmp_path_factory.mktemp("gw"), docs)
    audit = directory / "audit.jsonl"
    with running_gateway(directory, ServerOptions(audit_log=audit)) as server:
        yield server


def port_of(server: GatewayServer) -> int:
    return server.ports["http"]


def audit_records(server: GatewayServer) -> list[dict[str, Any]]:
    server.drain()
    assert server.options.audit_log
    return [json.loads(line) for line in server.options.audit_log.read_text().splitlines()]


def test_vendored_corpus_rows_replayed_byte_for_byte(edge: GatewayServer) -> None:
    result = replay(edge.ports["corpus"], load_rows(SAMPLE))
    assert result.attack_rate() == 1.0, result.misses
    assert result.benign_block_rate() == 0.0, result.misses


def test_attack_is_blocked_with_request_id_audit_and_counters(edge: GatewayServer) -> None:
    before = edge.gateway.route_stats(edge._slots["default/shop"])["blocked"]
    resp = get(port_of(edge), b"/search?q=1%27%20OR%201=1--")
    assert status_of(resp) == 403
    rid = resp.split(b"x-request-id: ")[1].split(b"\r\n")[0].decode()
    assert rid.encode() in resp.split(b"\r\n\r\n", 1)[1]
    record = next(r for r in audit_records(edge) if r["request_id"] == rid)
    assert record["event"] == "waf_blocked" and record["route"] == "default/shop"
    assert record["client"].startswith("127.0.0.1:") and record["anomaly_score"] >= 5
    assert {"942100", "949110"} <= {r["id"] for r in record["rules"]}
    assert edge.gateway.route_stats(edge._slots["default/shop"])["blocked"] == before + 1
    assert edge.metrics.rule_matches.labels("942100", "default/shop", "blocked")._value.get() >= 1


def test_clean_request_reaches_backend_with_forwarding_headers(
    edge: GatewayServer, backends: tuple[Backend, Backend]
) -> None:
    resp = get(port_of(edge), b"/shoes?size=42")
    assert status_of(resp) == 200 and b"x-backend: reached" in resp
    head = backends[0].seen[-1].lower()
    assert head.startswith(b"get /shoes?size=42 http/1.1")
    assert b"x-forwarded-for: 127.0.0.1" in head and b"x-request-id: " in head
    assert b"connection:" not in head


def test_routing_by_path_header_and_method(edge: GatewayServer, backends: tuple[Backend, Backend]) -> None:
    a, b = backends
    get(port_of(edge), b"/api/v1/items")
    assert b.seen[-1].startswith(b"GET /api/v1/items ")
    get(port_of(edge), b"/apix")  # PathPrefix matches whole segments: /apix is the shop's
    assert a.seen[-1].startswith(b"GET /apix ")
    post = (
        b"POST /admin HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: t\r\nAccept: */*\r\nX-Team: ops\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    exchange(port_of(edge), post)
    assert b.seen[-1].startswith(b"POST /admin ")
    exchange(port_of(edge), post.replace(b"X-Team: ops", b"X-Team: dev"))
    assert a.seen[-1].startswith(b"POST /admin ")


def test_two_host_headers_are_refused(edge: GatewayServer) -> None:
    # routed by one, served by the other would let a request pick its own route's WAF policy
    assert status_of(get(port_of(edge), b"/", b"shop.example", b"Host: a.detect.example\r\n")) == 400


def test_routing_uses_the_path_the_backend_resolves(
    tmp_path: Path, backends: tuple[Backend, Backend]
) -> None:
    """Dot segments (also %2e-encoded) and repeated slashes cannot steer a request around its route's WAF:
    /admin has a blocking policy, / none; the request goes on as received."""
    a, b = backends
    port = free_port()
    directory = write_config(
        tmp_path,
        [
            gateway_doc([{"name": "http", "port": port, "protocol": "HTTP"}]),
            service_doc("open", a.port),
            service_doc("admin", b.port),
            route_doc("open", "open"),
            route_doc("admin", "admin", matches=[{"path": {"type": "PathPrefix", "value": "/admin"}}]),
            policy_doc("strict", "HTTPRoute", "admin"),
        ],
    )
    with running_gateway(directory):
        for path in (b"//admin//x", b"/admin/./x"):  # clean: the admin backend, as received
            resp = get(port, path)
            assert status_of(resp) == 200 and b.seen[-1].startswith(b"GET " + path + b" "), path
        seen_open = len(a.seen)
        for path in (b"/pub/../admin/x", b"/pub/%2e%2e/admin/x", b"/pub/%2E./admin/x"):
            assert status_of(get(port, path)) == 403, path  # the admin route's WAF, not the open route
        assert len(a.seen) == seen_open
        get(port, b"/admin/../pub")
        assert a.seen[-1].startswith(b"GET /admin/../pub ")


def test_unknown_host_is_404(edge: GatewayServer) -> None:
    assert status_of(get(port_of(edge), b"/", b"other.example")) == 404


def test_detect_only_route_forwards_and_audits(edge: GatewayServer) -> None:
    resp = get(port_of(edge), b"/search?q=1%27%20OR%201=1--", b"a.detect.example")
    assert status_of(resp) == 200
    detected = [r for r in audit_records(edge) if r["event"] == "waf_detected"]
    assert detected and detected[-1]["route"] == "default/detect"


def test_body_limit_and_streamed_body_inspection(edge: GatewayServer) -> None:
    big = b"a=" + b"x" * 5000
    req = (
        b"POST / HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: t\r\nAccept: */*\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % len(big)
    ) + big
    assert status_of(exchange(port_of(edge), req)) == 413
    chunked_attack = (
        b"POST / HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: t\r\nAccept: */*\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nq=1'\r\n10\r\n OR 1=1-- abcdef\r\n0\r\n\r\n"
    )
    assert status_of(exchange(port_of(edge), chunked_attack)) == 403


def test_header_count_and_size_limits(edge: GatewayServer) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    resp = get(port_of(edge), extra=many)
    assert status_of(resp) == 431
    rid = resp.split(b"x-request-id: ")[1].split(b"\r\n")[0].decode()
    refused = next(r for r in audit_records(edge) if r["request_id"] == rid)
    assert refused["event"] == "request_refused" and refused["status"] == 431
    huge = b"X-Big: " + b"v" * 40_000 + b"\r\n"
    assert status_of(get(port_of(edge), extra=huge)) == 431


def test_malformed_request_is_400_and_other_connections_go_on(edge: GatewayServer) -> None:
    with socket.create_connection(("127.0.0.1", port_of(edge))) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: shop.example\r\n")  # unfinished, held open
        assert status_of(exchange(port_of(edge), b"GET / HTTP/1.1\r\nHost shop\r\n\r\n")) == 400
        assert status_of(exchange(port_of(edge), b"GET /\x00 HTTP/1.1\r\n\r\n")) == 400
        assert status_of(get(port_of(edge))) == 200


def test_keepalive_and_pipelining(edge: GatewayServer) -> None:
    one = b"GET /k HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"
    last = one.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    resp = exchange(port_of(edge), one * 3 + last)
    assert resp.count(b"HTTP/1.1 200 OK") == 4


def test_header_timeout(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    from gateway.dataplane import Limits

    port = free_port()
    directory = write_config(
        tmp_path,
        [
            gateway_doc([{"name": "http", "port": port, "protocol": "HTTP"}]),
            service_doc("shop", backends[0].port),
            route_doc("shop", "shop"),
        ],
    )
    with running_gateway(directory, ServerOptions(limits=Limits(header_timeout_ms=300))) as server:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            assert status_of(s.recv(4096)) == 408
        assert server.gateway.counters()["timeouts"] == 1


def test_backend_down_is_502(tmp_path: Path) -> None:
    port = free_port()
    directory = write_config(
        tmp_path,
        [
            gateway_doc([{"name": "http", "port": port, "protocol": "HTTP"}]),
            service_doc("gone", closed_port()),
            route_doc("gone", "gone"),
        ],
    )
    with running_gateway(directory):
        assert status_of(get(port)) == 502


def test_https_listener_with_sni_certificates(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    ca_pem, certs = tls_material(["shop.example", "api.example"])
    import base64

    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "api-cert", "namespace": "default"},
        "data": {
            "tls.crt": base64.b64encode(certs["api.example"][0]).decode(),
            "tls.key": base64.b64encode(certs["api.example"][1]).decode(),
        },
    }
    (tmp_path / "shop.crt").write_bytes(certs["shop.example"][0])
    (tmp_path / "shop.key").write_bytes(certs["shop.example"][1])
    port = free_port()
    listener = {
        "name": "https",
        "port": port,
        "protocol": "HTTPS",
        "tls": {
            "certificateRefs": [
                {"group": "ambit.io", "kind": "File", "name": "shop"},
                {"kind": "Secret", "name": "api-cert"},
            ]
        },
    }
    directory = write_config(
        tmp_path,
        [
            gateway_doc([listener]),
            secret,
            service_doc("shop", backends[0].port),
            route_doc("shop", "shop"),
            policy_doc("strict", "Gateway", "edge"),
        ],
    )
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    with running_gateway(directory) as server:
        for name, version in (
            ("shop.example", ssl.TLSVersion.TLSv1_3),
            ("api.example", ssl.TLSVersion.TLSv1_2),
        ):
            ctx.minimum_version = ctx.maximum_version = version
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                ctx.wrap_socket(raw, server_hostname=name) as tls,
            ):
                assert tls.version() == ("TLSv1.3" if version == ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
                tls.sendall(GET % (b"/x?q=1%27%20OR%201=1--", name.encode()))
                assert status_of(tls.recv(65536)) == 403
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                ctx.wrap_socket(raw, server_hostname=name) as tls,
            ):
                tls.sendall(GET % (b"/ok", name.encode()))
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                assert status_of(data) == 200
        assert backends[0].seen[-1].lower().count(b"x-forwarded-proto: https") == 1
        assert server.gateway.counters()["tls_handshakes"] >= 4
        errors = server.gateway.counters()["tls_errors"]
        with socket.create_connection(("127.0.0.1", port)) as raw:  # plain HTTP on the TLS port
            raw.sendall(GET % (b"/", b"shop.example"))
            with contextlib.suppress(ConnectionResetError):
                assert b"HTTP" not in raw.recv(100)
        assert server.gateway.counters()["tls_errors"] == errors + 1
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(cadata=ca_pem.decode())
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="shop.example")


def test_config_refused_with_reason_by_the_cli(tmp_path: Path) -> None:
    directory = write_config(
        tmp_path,
        [
            gateway_doc([{"name": "http", "port": closed_port(), "protocol": "HTTP"}]),
            service_doc("shop", 1),
            route_doc("shop", "shop"),
            policy_doc("bad", "Gateway", "edge", exclusions=[{"ruleIds": ["4242"]}]),
        ],
    )
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "gateway", "--config-dir", str(directory), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "4242 matches no CRS or custom rule" in run.stderr


def test_metrics_endpoint(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port, metrics_port = free_port(), closed_port()
    directory = write_config(
        tmp_path,
        [
            gateway_doc([{"name": "http", "port": port, "protocol": "HTTP"}]),
            service_doc("shop", backends[0].port),
            route_doc("shop", "shop"),
            policy_doc("crs", "Gateway", "edge"),
        ],
    )
    with running_gateway(directory, ServerOptions(metrics_listen=f"127.0.0.1:{metrics_port}")) as server:
        assert status_of(get(port)) == 200
        assert status_of(get(port, b"/?q=1%27%20OR%201=1--")) == 403
        server.drain()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("ambit_waf_requests_total", (("action", "allowed"), ("route", "default/shop")))] == 1
    assert samples[("ambit_waf_requests_total", (("action", "blocked"), ("route", "default/shop")))] == 1
    assert (
        samples[
            (
                "ambit_waf_rule_matches_total",
                (("action", "blocked"), ("route", "default/shop"), ("rule", "942100")),
            )
        ]
        == 1
    )
    assert samples[("ambit_gateway_requests_total", ())] == 2


def test_a_certificate_of_another_namespace_serves_only_while_granted(
    tmp_path: Path, backends: tuple[Backend, Backend]
) -> None:
    from gateway.server import load_plan
    from tests.gateway_fixtures import reference_grant_doc, tls_secret_doc

    ca_pem, certs = tls_material(["bank.example"])
    https_port, http_port = free_port(), free_port()
    listeners = [
        {
            "name": "https",
            "port": https_port,
            "protocol": "HTTPS",
            "tls": {"certificateRefs": [{"kind": "Secret", "name": "bank-tls", "namespace": "bank"}]},
        },
        {"name": "http", "port": http_port, "protocol": "HTTP"},
    ]
    docs = [
        gateway_doc(listeners),
        tls_secret_doc("bank-tls", "bank", *certs["bank.example"]),
        service_doc("shop", backends[0].port),
        route_doc("shop", "shop"),
    ]
    grant = reference_grant_doc("edge-certs", "bank", "Gateway", "default", "Secret", to_name="bank-tls")
    ctx = ssl.create_default_context(cadata=ca_pem.decode())

    def over_tls() -> int:
        with (
            socket.create_connection(("127.0.0.1", https_port)) as raw,
            ctx.wrap_socket(raw, server_hostname="bank.example") as tls,
        ):
            tls.sendall(GET % (b"/ok", b"bank.example"))
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return status_of(data)

    with running_gateway(write_config(tmp_path / "granted", [*docs, grant])) as server:
        assert over_tls() == 200 and status_of(get(http_port, b"/ok")) == 200
        # The grant removed: the next config refuses the https listener alone, which keeps its port and
        # closes every connection (counted), never serving it in the clear; http keeps serving.
        revoked = load_plan(write_config(tmp_path / "revoked", docs))
        assert revoked.listeners[0].refused and "no ReferenceGrant" in revoked.listeners[0].refused
        server.reload(revoked)
        refused = server.gateway.counters()["conns_refused"]
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            over_tls()
        with socket.create_connection(("127.0.0.1", https_port)) as raw:
            raw.sendall(GET % (b"/ok", b"bank.example"))
            with contextlib.suppress(ConnectionResetError):
                assert raw.recv(100) == b""
        assert server.gateway.counters()["conns_refused"] >= refused + 2
        assert status_of(get(http_port, b"/ok")) == 200
        server.reload(load_plan(write_config(tmp_path / "granted", [*docs, grant])))
        assert over_tls() == 200
