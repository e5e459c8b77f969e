"""The admin API over real HTTP: endpoints, missing providers, /logging, redaction, loopback-only bind."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.admin import ENDPOINTS, AdminError, AdminServer

JOIN_TOKEN = "jt-7f1d2c9a8b3e4f5a6b7c8d9e0f1a2b3c"


def _pem_key() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def config_with_secrets() -> dict[str, Any]:
    key = _pem_key()
    return {
        "version": 12,
        "node": {"name": "node-1", "join_token": JOIN_TOKEN, "key_pem": key},
        "svids": [{"spiffe_id": "spiffe://cluster.local/ns/a/sa/b", "chain_pem": "cert", "key": key}],
        "log": f"bootstrapped with {key}",
        "raw": key.encode(),
    }


def request(port: int, path: str, method: str = "GET") -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def admin() -> Iterator[AdminServer]:
    levels: list[str] = []

    def set_level(level: str) -> str:
        if level not in ("info", "debug"):
            raise ValueError(f"unknown level {level}")
        levels.append(level)
        return level

    def broken() -> Any:
        raise RuntimeError("relay not connected")

    server = AdminServer(
        "127.0.0.1:0",
        providers={
            "config_dump": config_with_secrets,
            "workloads": lambda: [{"uid": "a/b", "ips": ["10.244.1.2"], "node": "node-1"}],
            "certs": lambda: [{"identity": "spiffe://cluster.local/ns/a/sa/b", "not_after": 1.0}],
            "connections": broken,
        },
        log_level_setter=set_level,
    )
    server.start()
    yield server
    server.stop()


def test_config_dump_never_serves_a_key_or_token(admin: AdminServer) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin.port}/config_dump", timeout=10) as resp:
        body = resp.read().decode()
    assert "PRIVATE KEY" not in body
    assert JOIN_TOKEN not in body
    dump = json.loads(body)
    assert dump["version"] == 12 and dump["node"]["name"] == "node-1"
    assert dump["node"]["join_token"] == "<redacted>"


def test_endpoints_and_errors(admin: AdminServer) -> None:
    status, rows = request(admin.port, "/workloads")
    assert status == 200 and rows[0]["uid"] == "a/b"
    status, index = request(admin.port, "/")
    assert status == 200 and set(ENDPOINTS) <= set(index["endpoints"])
    status, err = request(admin.port, "/bpf")
    assert status == 404 and "no bpf provider" in err["error"]
    status, err = request(admin.port, "/nope")
    assert status == 404
    status, err = request(admin.port, "/connections")
    assert status == 500 and "relay not connected" in err["error"]
    status, _ = request(admin.port, "/workloads", "POST")
    assert status == 405


def test_logging_get_and_set(admin: AdminServer) -> None:
    assert request(admin.port, "/logging")[0] == 200
    assert request(admin.port, "/logging?level=debug", "POST") == (200, {"level": "debug"})
    assert request(admin.port, "/logging") == (200, {"level": "debug"})
    assert request(admin.port, "/logging?level=info") == (200, {"level": "info"})  # Envoy-style GET works too
    status, err = request(admin.port, "/logging?level=loud", "POST")
    assert status == 400 and "loud" in err["error"]


def test_default_log_level_setter_drives_python_logging() -> None:
    root = logging.getLogger()
    old = root.level
    server = AdminServer("127.0.0.1:0", providers={})
    server.start()
    try:
        assert request(server.port, "/logging?level=debug", "POST") == (200, {"level": "debug"})
        assert root.level == logging.DEBUG
        assert request(server.port, "/logging?level=warn", "POST") == (200, {"level": "warning"})
        assert request(server.port, "/logging?level=verbose", "POST")[0] == 400
    finally:
        server.stop()
        root.setLevel(old)


def test_refuses_non_loopback_bind_unless_forced() -> None:
    with pytest.raises(AdminError, match="not a loopback"):
        AdminServer("0.0.0.0:15000", providers={})
    with pytest.raises(AdminError):
        AdminServer("10.0.0.1:15000", providers={})
    AdminServer("0.0.0.0:0", providers={}, allow_non_loopback=True)  # constructed, not started
    AdminServer("[::1]:0", providers={})


def test_garbage_requests_do_not_break_the_server(admin: AdminServer) -> None:
    for raw in (
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
        b"POST /logging?level=debug HTTP/1.1\r\nHost: x\r\nContent-Length: nine\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", admin.port), timeout=10) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(4096)
        assert b" 200 " not in answer.split(b"\r\n", 1)[0]
    assert request(admin.port, "/workloads")[0] == 200
