"""`ambit gateway` as its own process: serves a config directory, SIGHUP reloads it (a refused config keeps
the running one), SIGTERM stops it cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.gateway_corpus import Backend, exchange, status_of
from tests.gateway_fixtures import closed_port, gateway_doc, policy_doc, route_doc, service_doc, write_config

ATTACK = (
    b"GET /?q=1%27%20OR%201=1-- HTTP/1.1\r\nHost: a\r\nUser-Agent: t\r\nAccept: */*\r\n"
    b"Connection: close\r\n\r\n"
)


def _wait_status(port: int, want: int, timeout: float = 20.0) -> int:
    deadline, got = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        try:
            got = status_of(exchange(port, ATTACK, timeout=5))
        except OSError:
            got = 0
        if got == want:
            return got
        time.sleep(0.1)
    return got


def test_serve_reload_refuse_and_stop(tmp_path: Path) -> None:
    backend = Backend()
    port = closed_port()  # the gateway process binds it
    docs = [
        gateway_doc([{"name": "http", "port": port, "protocol": "HTTP"}]),
        service_doc("app", backend.port),
        route_doc("app", "app"),
    ]
    directory = write_config(tmp_path / "cfg", docs)
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "gateway", "--config-dir", str(directory), "--threads", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert _wait_status(port, 200) == 200  # no WAF yet: the attack reaches the backend
        (directory / "waf.yaml").write_text(yaml.safe_dump(policy_doc("crs", "Gateway", "edge")))
        proc.send_signal(signal.SIGHUP)
        assert _wait_status(port, 403) == 403
        (directory / "waf.yaml").write_text(
            yaml.safe_dump(policy_doc("crs", "Gateway", "edge", exclusions=[{"ruleIds": ["4242"]}]))
        )
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # the refusal is logged; the running config must stay
        assert status_of(exchange(port, ATTACK)) == 403
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        backend.close()
    text = (tmp_path / "gateway.log").read_text()
    assert "reload refused, the previous config stays" in text and "4242 matches no CRS" in text


def test_plane_mode_usage_errors(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "agent.cli", "gateway", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    neither = run()
    assert neither.returncode != 0 and "--config-dir D (files) or --plane ADDR" in neither.stderr
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("")
    plane = ("--plane", "127.0.0.1:1", "--gateway", "shop/edge", "--trust-bundle", str(bundle))
    no_token = run(*plane)
    assert no_token.returncode != 0 and "--join-token-file F" in no_token.stderr
    with_dir = run(*plane, "--join-token", "t", "--identity-dir", str(tmp_path))
    assert with_dir.returncode != 0 and "the SVID comes from the plane" in with_dir.stderr


def test_listen_address_overrides_the_gateways_external_address(tmp_path: Path) -> None:
    """On Kubernetes a Gateway's spec.addresses names its load balancer address, which the pod does not
    hold: `--listen-address` (the chart passes 0.0.0.0) binds the listeners there instead."""
    backend = Backend()
    port = closed_port()
    gw = gateway_doc([{"name": "http", "port": port, "protocol": "HTTP"}])
    gw["spec"]["addresses"] = [{"type": "IPAddress", "value": "203.0.113.10"}]  # TEST-NET-3, not ours
    docs = [gw, service_doc("app", backend.port), route_doc("app", "app")]
    directory = write_config(tmp_path / "cfg", docs)
    base = [sys.executable, "-m", "agent.cli", "gateway", "--config-dir", str(directory), "--threads", "1"]
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr  # never a silent fallback to another address
    assert "cannot listen on 203.0.113.10" in refused.stderr and "Traceback" not in refused.stderr
    proc = subprocess.Popen([*base, "--listen-address", "127.0.0.1"], stdout=subprocess.DEVNULL)
    try:
        assert _wait_status(port, 200) == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        backend.close()
