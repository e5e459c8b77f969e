"""Several HTTP services accept on one thread (the agent's admin, metrics and readiness ports)."""

from __future__ import annotations

import threading
import urllib.request

from agent.observe.servers import HttpService, Request, ServiceGroup, text


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return str(resp.read().decode())


def test_one_thread_accepts_for_every_service_and_stop_releases_the_ports() -> None:
    services = [
        HttpService(name, "127.0.0.1:0", lambda req, n=name: text(200, f"{n} {req.path}")) for name in "ab"
    ]
    group = ServiceGroup("http-test", services)
    before = {t.name for t in threading.enumerate()}
    group.start()
    try:
        assert [t.name for t in threading.enumerate() if t.name not in before] == ["http-test"]
        ports = [s.port for s in services]
        for _ in range(3):  # served again and again, each service its own route
            assert [_get(p, "/x") for p in ports] == ["a /x", "b /x"]
    finally:
        group.stop()
    assert not any(t.name == "http-test" for t in threading.enumerate())
    for service, port in zip(services, ports, strict=True):
        again = HttpService(service.name, f"127.0.0.1:{port}", lambda req: text(200, ""))
        again.bind()  # the port is free again
        again.stop()


def test_a_request_object_is_what_the_route_sees() -> None:
    seen: list[Request] = []
    service = HttpService("c", "127.0.0.1:0", lambda req: seen.append(req) or text(200, "ok"))
    group = ServiceGroup("http-test-2", [service])
    group.start()
    try:
        assert _get(service.port, "/p?q=1") == "ok"
    finally:
        group.stop()
    assert seen[0].path == "/p" and seen[0].query == {"q": "1"}
