"""Bounds of the C data plane, through its Python API on loopback: the WAF event queue, the connection
limit, and config swaps under a running gateway."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from api.resources import Meta
from api.resources.wafpolicy import TargetRef, WafPolicy
from gateway import dataplane as dp
from gateway.waf import RuleSetCache
from tests.gateway_corpus import Backend, exchange, status_of

ATTACK = b"GET /?q=1%27%20OR%201=1-- HTTP/1.1\r\nHost: a\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"
CLEAN = b"GET /ok HTTP/1.1\r\nHost: a\r\nUser-Agent: t\r\nAccept: */*\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def crs() -> dp.WafRules:
    return RuleSetCache().compile(WafPolicy(Meta("p", "default"), (TargetRef("Gateway", "g", "default"),)))


def _config(backend_port: int, waf: dp.WafRules | None) -> dp.Config:
    cfg = dp.Config()
    cfg.listener(1, None)
    b = cfg.backend([f"127.0.0.1:{backend_port}"])
    mode = dp.WAF_BLOCK if waf else dp.WAF_OFF
    cfg.route(dp.RouteEntry(1, "", "/", False, (), "", b, waf, mode, 1 << 20, 0, "default/r"))
    return cfg


def _gateway(limits: dp.Limits, cfg: dp.Config) -> tuple[dp.Gateway, int]:
    g = dp.Gateway(1, limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    g.listen(sock.detach(), 1)
    g.apply(cfg)
    g.start()
    return g, port


def test_event_queue_is_bounded_and_drops_are_counted(backend: Backend, crs: dp.WafRules) -> None:
    g, port = _gateway(dp.Limits(event_queue=4), _config(backend.port, crs))
    try:
        for _ in range(6):
            assert status_of(exchange(port, ATTACK)) == 403
        events = g.events()
        assert len(events) == 4 and all(e.action == "blocked" for e in events)
        assert g.counters()["events_dropped"] == 2
        assert g.route_stats(0)["blocked"] == 6  # counting does not depend on the queue
    finally:
        g.stop()


def test_connection_limit(backend: Backend) -> None:
    g, port = _gateway(dp.Limits(max_connections=2), _config(backend.port, None))
    try:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for s in held:
            s.sendall(b"GET / HTTP/1.1\r\n")
        deadline = time.monotonic() + 5
        while g.counters()["conns_active"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
            assert third.recv(100) == b""
        assert g.counters()["conns_refused"] == 1
        for s in held:
            s.close()
        while g.counters()["conns_active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert status_of(exchange(port, CLEAN)) == 200
    finally:
        g.stop()


def test_config_swap_applies_to_new_requests(backend: Backend, crs: dp.WafRules) -> None:
    g, port = _gateway(dp.Limits(), _config(backend.port, None))
    try:
        assert status_of(exchange(port, ATTACK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))) == 200
        g.apply(_config(backend.port, crs))
        assert status_of(exchange(port, ATTACK)) == 403
    finally:
        g.stop()


def test_bad_backend_address_and_route_are_refused() -> None:
    cfg = dp.Config()
    with pytest.raises(dp.DataplaneError, match="bad backend address"):
        cfg.backend(["not-an-ip:80"])
    with pytest.raises(dp.DataplaneError, match="unknown backend"):
        cfg.route(dp.RouteEntry(1, "", "/", False, (), "", 7, None, dp.WAF_OFF, 1, 0, "r"))
    with pytest.raises(dp.DataplaneError, match="no certificate"):
        dp.ServerTls().add("", b"junk", b"junk")
