"""`ambit debug` against a live admin API on loopback (no lab): every view, formats, unreachable agent."""

from __future__ import annotations

import copy
import functools
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.admin import AdminServer

PROVIDERS: dict[str, Any] = {
    "workloads": [
        {"uid": "shop/web", "ips": ["10.244.1.2"], "node": "node-1", "protocol": "HBONE"},
        {"uid": "shop/database", "ips": ["10.244.1.3"], "node": "node-1", "protocol": "HBONE"},
    ],
    "services": [{"name": "shop/db", "addresses": ["10.96.0.10"], "ports": [5432]}],
    "policies": [{"name": "shop/allow-web", "action": "ALLOW", "rules": 1}],
    "certs": [{"identity": "spiffe://cluster.local/ns/shop/sa/web", "not_after": "2026-11-29T00:00:00Z"}],
    "connections": [
        {"id": 1, "src": "10.244.1.2:40000", "dst": "10.244.2.2:8080", "bytes": 10},
        {"id": 2, "src": "10.244.1.3:40001", "dst": "10.244.2.2:8080", "tls": {"version": "TLSv1.3"}},
    ],
    "bpf": {"counters": {"redirect": 3}, "rows": [{"pod_ip": "10.244.1.2", "workload": "shop/web"}]},
    "config_dump": {"version": 4, "node": {"join_token": "jt-secret-123"}},
}


def ambit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def admin() -> Iterator[str]:
    root_level = logging.getLogger().level  # the default /logging setter changes this process's logging
    server = AdminServer(
        "127.0.0.1:0", {k: functools.partial(copy.deepcopy, v) for k, v in PROVIDERS.items()}
    )
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop()
    logging.getLogger().setLevel(root_level)


def test_workloads_table_and_json(admin: str) -> None:
    table = ambit("debug", "--admin", admin, "workloads")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["UID", "IPS", "NODE", "PROTOCOL"]
    assert lines[1].index("10.244.1.2") == lines[0].index("IPS")  # aligned columns
    as_json = ambit("debug", "--admin", admin, "workloads", "-o", "json")
    assert json.loads(as_json.stdout) == PROVIDERS["workloads"]
    as_yaml = ambit("debug", "--admin", admin, "workloads", "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout) == PROVIDERS["workloads"]


def test_rows_with_different_keys(admin: str) -> None:
    table = ambit("debug", "--admin", admin, "connections")
    assert table.stdout.splitlines()[0].split() == ["ID", "SRC", "DST", "BYTES", "TLS"]
    assert '{"version":"TLSv1.3"}' in table.stdout


def test_sections_and_config(admin: str) -> None:
    bpf = ambit("debug", "--admin", admin, "bpf")
    assert bpf.returncode == 0 and "ROWS:" in bpf.stdout and "redirect" in bpf.stdout
    config = ambit("debug", "--admin", admin, "config")
    assert yaml.safe_load(config.stdout)["version"] == 4
    assert "jt-secret-123" not in config.stdout


def test_log_level(admin: str) -> None:
    shown = ambit("debug", "--admin", admin, "log-level", "-o", "json")
    assert "level" in json.loads(shown.stdout)
    changed = ambit("debug", "--admin", admin, "log-level", "debug", "-o", "json")
    assert json.loads(changed.stdout) == {"level": "debug"}
    bad = ambit("debug", "--admin", admin, "log-level", "loud&level=debug")
    assert bad.returncode == 2 and "loud" in bad.stderr


def test_unreachable_agent_is_one_clear_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        proc = ambit("debug", "--admin", f"127.0.0.1:{port}", "workloads")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot reach the agent admin API" in proc.stderr
    assert proc.stdout == ""
    bad = ambit("debug", "--admin", "localhost", "workloads")
    assert bad.returncode == 2 and "not HOST:PORT" in bad.stderr


def test_missing_provider_is_reported(admin: str) -> None:
    server = AdminServer("127.0.0.1:0", {})
    server.start()
    try:
        proc = ambit("debug", "--admin", f"127.0.0.1:{server.port}", "certs")
    finally:
        server.stop()
    assert proc.returncode == 2 and "no certs provider" in proc.stderr


def test_filters_in_any_position(admin: str) -> None:
    by_ns = ambit("debug", "-n", "shop", "--admin", admin, "workloads", "-o", "json")
    assert len(json.loads(by_ns.stdout)) == 2
    assert json.loads(ambit("debug", "workloads", "-n", "other", "--admin", admin, "-o", "json").stdout) == []
    web = json.loads(ambit("debug", "--workload", "web", "--admin", admin, "workloads", "-o", "json").stdout)
    assert [w["uid"] for w in web] == ["shop/web"]
    # An address matches an IP in a list and an ip:port column alike.
    conns = json.loads(
        ambit("debug", "connections", "--address", "10.244.1.3", "--admin", admin, "-o", "json").stdout
    )
    assert [c["id"] for c in conns] == [2]
    by_ip = ambit("debug", "workloads", "--address", "10.244.1.2", "--admin", admin, "-o", "json")
    assert [w["uid"] for w in json.loads(by_ip.stdout)] == ["shop/web"]


def test_all_view(admin: str) -> None:
    everything = json.loads(ambit("debug", "all", "--admin", admin, "-o", "json").stdout)
    assert set(everything) == {
        "workloads",
        "services",
        "reachable",
        "policies",
        "certs",
        "trust-bundle",
        "connections",
        "bpf",
        "threads",
    }
    assert "no trust_bundle provider" in everything["trust-bundle"]["error"]  # a part that does not run
    assert everything["workloads"] == PROVIDERS["workloads"]
    only = json.loads(ambit("debug", "all", "--address", "10.244.1.3", "--admin", admin, "-o", "json").stdout)
    assert [w["uid"] for w in only["workloads"]] == ["shop/database"] and len(only["connections"]) == 1
    table = ambit("debug", "--admin", admin, "all")
    assert table.returncode == 0 and "== WORKLOADS ==" in table.stdout and "== CERTS ==" in table.stdout


# Stands in for `ssh -W 127.0.0.1:15000 node1`: copies its stdin to a TCP port and the answer back.
BRIDGE = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(sys.stdin.buffer.read())
s.shutdown(socket.SHUT_WR)
while data := s.recv(65536):
    sys.stdout.buffer.write(data)
"""


def test_tunnel_reaches_a_loopback_admin_api(admin: str, tmp_path: Path) -> None:
    bridge = tmp_path / "bridge.py"
    bridge.write_text(BRIDGE)
    port = admin.rpartition(":")[2]
    tunnel = f"{sys.executable} {bridge} {port}"
    got = ambit("debug", "workloads", "--tunnel", tunnel, "-o", "json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == PROVIDERS["workloads"]
    refused = ambit("debug", "--tunnel", f"{sys.executable} {bridge} 1", "certs")
    assert refused.returncode == 2 and refused.stderr.startswith("ambit: error: cannot reach")
    assert len(refused.stderr.strip().splitlines()) == 1
