"""The gateway on the lab with the real mesh: a request from outside the mesh (node-2's host namespace)
through the gateway reaches pod-2-1 over HBONE, and pod-2-1's agent saw the gateway's SPIFFE identity;
pod-2-1 admits only the gateway (an AuthorizationPolicy on its principal); an attack is blocked with an audit
record. Two modes: from files in pod-1-2 (an enrolled workload: the node agent carries it with the pod's
identity), and from the lab's plane on node-1 (its own SVID by CSR, config over the relay, HBONE itself; a
config change is ACKed, a bad WafPolicy NACKed with the old config serving)."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from agent import netns as nsx
from agent.lab import control, mesh
from agent.lab import gateway as lab_gateway
from agent.lab.plan import LabPlan
from tests.conftest import ambit_cli, running_mesh
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


PLANE_GATEWAY, PLANE_GATEWAY_PORT = "demo/edge", 8001
PLANE_GATEWAY_ID = f"spiffe://{mesh.TRUST_DOMAIN}/ns/{mesh.MESH_NAMESPACE}/sa/edge-ambit"


def _plane_gateway_docs(plan: LabPlan, extra: list[dict[str, object]]) -> list[dict[str, object]]:
    """Gateway demo/edge on node-1's address, a route to a Service selecting the app pod, the CRS."""
    ns = mesh.MESH_NAMESPACE
    gw = gateway_doc([{"name": "http", "port": PLANE_GATEWAY_PORT, "protocol": "HTTP"}])
    gw["metadata"]["namespace"] = ns
    gw["spec"]["addresses"] = [{"type": "IPAddress", "value": plan.node("node-1").ip}]
    route = route_doc("app", "app")
    route["metadata"]["namespace"] = ns
    service = {
        "apiVersion": "ambit.io/v1",
        "kind": "Service",
        "metadata": {"name": "app", "namespace": ns},
        "spec": {
            "addresses": ["10.96.0.20"],
            "ports": [{"port": 80, "targetPort": mesh.APP_PORT}],
            "selector": {"app": APP_POD},
        },
    }
    waf = policy_doc("crs", "Gateway", "edge")
    waf["metadata"]["namespace"] = ns
    return [gw, route, service, waf, *extra]


def _write_plane_config(plan: LabPlan, docs: list[dict[str, object]]) -> None:
    path = mesh.config_dir(plan.prefix) / "gateway.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    tmp.replace(path)


def _plane_rows(plan: LabPlan) -> list[dict[str, object]]:
    def get() -> str:
        url = f"http://{plan.mgmt_ip}:{mesh.PLANE_METRICS_PORT}/debug/status"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    status = json.loads(nsx.run_in(plan.fabric_netns, get, timeout=10))
    rows: list[dict[str, object]] = status["nodes"]
    return rows


def _gateway_row(plan: LabPlan) -> dict[str, object]:
    return next((r for r in _plane_rows(plan) if r["node"] == f"gateway:{PLANE_GATEWAY}"), {})


def _eventually(pred: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _outside(plan: LabPlan, path: bytes) -> bytes:
    raw = b"GET %s HTTP/1.1\r\nHost: shop\r\nUser-Agent: t\r\nAccept: */*\r\nConnection: close\r\n\r\n" % path
    result: bytes = nsx.run_in(
        plan.node("node-2").netns, exchange, PLANE_GATEWAY_PORT, raw, 10.0, plan.node("node-1").ip, timeout=30
    )
    return result


def test_gateway_from_the_plane_enters_the_mesh_with_its_own_identity(meshlab: LabPlan) -> None:
    """The gateway on node-1 (outside every pod) gets its SVID and config from the lab's plane and speaks
    HBONE itself; pod-2-1 admits only the gateway's own identity."""
    app = meshlab.pod(APP_POD)
    if not mesh.running(meshlab.prefix, f"app-{app.name}"):
        _start_app(meshlab)
    only_gateway = mesh.allow_only(APP_POD, [])
    only_gateway["spec"]["rules"] = [
        {"from": [{"source": {"principals": [PLANE_GATEWAY_ID[len("spiffe://") :]]}}]}
    ]
    mesh.set_policies(meshlab, [only_gateway])
    _write_plane_config(meshlab, _plane_gateway_docs(meshlab, []))
    started = ambit_cli(
        "gateway",
        "--lab-node",
        "node-1",
        "--gateway",
        PLANE_GATEWAY,
        "--port",
        str(PLANE_GATEWAY_PORT),
        "--prefix",
        meshlab.prefix,
    )
    label = "gateway-" + PLANE_GATEWAY.replace("/", "-")
    logs = mesh.run_dir(meshlab.prefix) / "logs"
    log, audit = logs / f"{label}.log", logs / f"{label}-audit.jsonl"
    assert str(audit) in started.stdout
    try:
        assert f"identity {PLANE_GATEWAY_ID} from the plane" in log.read_text()
        ok = _outside(meshlab, b"/hello")
        assert status_of(ok) == 200 and BACKEND_MARK in ok, ok
        access = mesh.run_dir(meshlab.prefix) / "logs" / "access-node-2.jsonl"

        def seen_as_gateway() -> bool:
            lines = access.read_text().splitlines() if access.exists() else []
            return any(
                r.get("destination_ip") == app.ip and r.get("source_principal") == PLANE_GATEWAY_ID
                for r in map(json.loads, lines)
            )

        _eventually(seen_as_gateway, "pod-2-1's agent to record the gateway's identity")
        attack = _outside(meshlab, b"/?q=1%27%20OR%201=1--")
        assert status_of(attack) == 403
        rid = attack.split(b"x-request-id: ")[1].split(b"\r\n")[0].decode()

        def blocked() -> bool:
            text = audit.read_text() if audit.exists() else ""
            return any(
                r.get("request_id") == rid and r["event"] == "waf_blocked"
                for r in map(json.loads, text.splitlines())
            )

        _eventually(blocked, "the waf_blocked audit record")

        # A change on the plane reaches the running gateway (versioned ACK).
        _eventually(lambda: _gateway_row(meshlab).get("state") == "SYNCED", "the gateway's first ACK")
        first = int(_gateway_row(meshlab)["acked_version"])  # type: ignore[call-overload]
        v2 = route_doc("v2", "app", matches=[{"path": {"type": "PathPrefix", "value": "/v2"}}])
        v2["metadata"]["namespace"] = mesh.MESH_NAMESPACE
        _write_plane_config(meshlab, _plane_gateway_docs(meshlab, [v2]))
        _eventually(
            lambda: (
                int(_gateway_row(meshlab).get("acked_version", 0)) > first  # type: ignore[call-overload]
                and _gateway_row(meshlab).get("state") == "SYNCED"
            ),
            "the ACK of the change",
        )
        assert status_of(_outside(meshlab, b"/v2/x")) == 200
        acked = _gateway_row(meshlab)["acked_version"]

        # A bad WafPolicy is NACKed with its reason; the old config keeps serving.
        bad = policy_doc("strict", "HTTPRoute", "v2", exclusions=[{"ruleIds": ["999999"]}])
        bad["metadata"]["namespace"] = mesh.MESH_NAMESPACE
        _write_plane_config(meshlab, _plane_gateway_docs(meshlab, [v2, bad]))
        _eventually(lambda: _gateway_row(meshlab).get("state") == "NACKED", "the NACK")
        row = _gateway_row(meshlab)
        assert row["acked_version"] == acked and "999999" in str(row["last_nack"])
        assert status_of(_outside(meshlab, b"/v2/x")) == 200
        assert status_of(_outside(meshlab, b"/v2?q=1%27%20OR%201=1--")) == 403
    finally:
        control.stop_process(meshlab.prefix, label)
        (mesh.config_dir(meshlab.prefix) / "gateway.yaml").unlink(missing_ok=True)
