"""The gateway on the lab with the real mesh: a request from outside the mesh (node-2's host namespace)
through the gateway (in pod-1-2, an enrolled workload) reaches pod-2-1 over HBONE, and pod-2-1's agent saw
the gateway's SPIFFE identity; pod-2-1 admits only the gateway (an AuthorizationPolicy on its principal);
an attack is blocked with an audit record."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import netns as nsx
from agent.lab import control, mesh
from agent.lab import gateway as lab_gateway
from agent.lab.plan import LabPlan
from tests.conftest import running_mesh
from tests.gateway_corpus import BACKEND_MARK, exchange, status_of
from tests.gateway_fixtures import gateway_doc, policy_doc, route_doc, write_config

pytestmark = pytest.mark.root

GATEWAY_POD, APP_POD = "pod-1-2", "pod-2-1"
GATEWAY_PORT = 8000


@pytest.fixture(scope="module")
def meshlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabPlan]:
    with running_mesh(tmp_path_factory, 2, (), 7) as plan:
        yield plan


def _request(plan: LabPlan, raw: bytes) -> bytes:
    result: bytes = nsx.run_in(
        plan.node("node-2").netns, exchange, GATEWAY_PORT, raw, 10.0, plan.pod(GATEWAY_POD).ip, timeout=30
    )
    return result


def _start_app(plan: LabPlan) -> None:
    pod = plan.pod(APP_POD)
    argv = [
        sys.executable,
        "-c",
        f"from tests.gateway_corpus import Backend; Backend({pod.ip!r}, {mesh.APP_PORT}).serve_forever()",
    ]
    control.start_process(
        plan.prefix,
        f"app-{pod.name}",
        pod.netns,
        argv,
        mesh.run_dir(plan.prefix) / "logs" / f"app-{pod.name}.log",
    )
    mesh.wait_listening(pod.netns, pod.ip, mesh.APP_PORT, f"app in {pod.name}")


def test_outside_request_reaches_meshed_pod_as_the_gateway(meshlab: LabPlan, tmp_path: Path) -> None:
    app = meshlab.pod(APP_POD)
    _start_app(meshlab)
    mesh.set_policies(meshlab, [mesh.allow_only(APP_POD, [GATEWAY_POD])])
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "app", "namespace": "default"},
        "spec": {"addresses": [app.ip], "ports": [{"port": 80, "targetPort": mesh.APP_PORT}]},
    }
    gw = gateway_doc([{"name": "http", "port": GATEWAY_PORT, "protocol": "HTTP"}])
    gw["spec"]["addresses"] = [{"type": "IPAddress", "value": "0.0.0.0"}]
    config = write_config(
        tmp_path / "gw", [gw, service, route_doc("app", "app"), policy_doc("crs", "Gateway", "edge")]
    )
    audit = lab_gateway.start(meshlab.prefix, GATEWAY_POD, config, GATEWAY_PORT)

    ok = _request(
        meshlab,
        b"GET /hello HTTP/1.1\r\nHost: shop\r\nUser-Agent: t\r\nAccept: */*\r\nConnection: close\r\n\r\n",
    )
    assert status_of(ok) == 200 and BACKEND_MARK in ok

    def direct() -> bytes:  # pod-1-1 is no gateway: the app's policy refuses it
        try:
            return exchange(mesh.APP_PORT, b"GET / HTTP/1.1\r\nHost: app\r\n\r\n", 5.0, app.ip)
        except OSError:
            return b""

    assert BACKEND_MARK not in nsx.run_in(meshlab.pod("pod-1-1").netns, direct, timeout=30)
    attack = _request(
        meshlab, b"GET /?q=1%27%20OR%201=1-- HTTP/1.1\r\nHost: shop\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"
    )
    assert status_of(attack) == 403
    rid = attack.split(b"x-request-id: ")[1].split(b"\r\n")[0].decode()
    deadline = time.monotonic() + 10
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline and not records:
        text = audit.read_text() if audit.exists() else ""
        records = [r for r in map(json.loads, text.splitlines()) if r.get("request_id") == rid]
        time.sleep(0.2)
    assert records and records[0]["event"] == "waf_blocked"
    assert "942100" in [r["id"] for r in records[0]["rules"]]  # type: ignore[index,union-attr]
    # The gateway pools its upstream connection; agents log connections when they close.
    control.stop_process(meshlab.prefix, f"gateway-{GATEWAY_POD}")
    deadline = time.monotonic() + 10
    closed: list[dict[str, object]] = []
    while time.monotonic() < deadline and not closed:
        log = mesh.run_dir(meshlab.prefix) / "logs" / "access-node-2.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        closed = [
            r
            for r in map(json.loads, lines)
            if r.get("event") == "close" and r.get("destination_ip") == app.ip
        ]
        time.sleep(0.2)
    assert closed, "the destination agent logged no connection to the app"
    assert closed[-1]["source_principal"] == f"spiffe://{mesh.principal(GATEWAY_POD)}"
