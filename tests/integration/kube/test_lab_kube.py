"""End to end: a netns lab whose workloads are Pods in the real API server (`ambit lab up --kube`).

The plane runs with --source kube; agents enrol what the API says runs on their node. pod-2-2 starts
absent from the API (its netns exists, like a pod whose sandbox is up before its IP is reported).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator

import pytest

from agent import netns as nsx
from agent.lab import control, kube, kubelab, mesh
from agent.lab.capture import Capture
from agent.lab.plan import LabPlan, plan_lab
from agent.lab.probe import ECHO_PORT, echo_roundtrip
from agent.redirect.marks import HBONE_PORT
from api.resources.workload import AMBIENT, DATAPLANE_LABEL
from tests.conftest import live_connection

pytestmark = pytest.mark.root
LATE_POD = "pod-2-2"
WAIT_S = 20.0


@pytest.fixture(scope="module")
def kubelab_plan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabPlan]:
    prefix = "k" + uuid.uuid4().hex[:4] + "-"
    os.environ["AMBIT_LAB_STATE_DIR"] = str(tmp_path_factory.mktemp("kubelab"))
    plan = plan_lab(2, 2, prefix)
    control.up(plan)
    try:
        kubelab.up(plan, lambda _: None, skip_pods=[LATE_POD])
        mesh.up(plan, lambda _: None)
        for pod in ("pod-2-1", "pod-2-2", "pod-1-2"):
            mesh.start_echo_server(plan, pod, ECHO_PORT)
        yield plan
    finally:
        control.down(prefix)
        os.environ.pop("AMBIT_LAB_STATE_DIR", None)


def _echo(plan: LabPlan, src: str, ip: str, payload: bytes, port: int = ECHO_PORT) -> bytes | str:
    def run(ip: str) -> bytes | str:
        try:
            return echo_roundtrip(ip, port, payload, timeout=5)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"

    result: bytes | str = nsx.run_in(plan.pod(src).netns, run, ip, timeout=20)
    return result


def _enrolled(plan: LabPlan, node: str, pod: str) -> bool:
    rows = mesh.admin_get(plan, node, "/workloads")
    return any(r["workload"] == f"{mesh.MESH_NAMESPACE}/{pod}" and r["enrolled"] for r in rows)


def _wire_ports(plan: LabPlan, src: str, dst: str) -> dict[int, int]:
    """Server ports seen on the source node's link while `src` echoes to `dst`."""
    capture = Capture(plan.fabric_netns, plan.node(plan.pod(src).node).fabric_ifname)
    capture.start()
    payload = b"kube-e2e-" + str(time.time_ns()).encode()
    assert _echo(plan, src, plan.pod(dst).ip, payload) == payload
    return dict(capture.stop(payload, {HBONE_PORT, ECHO_PORT}).ports)


def test_pod_created_then_deleted_is_enrolled_then_unenrolled(kubelab_plan: LabPlan) -> None:
    plan = kubelab_plan
    assert not _enrolled(plan, "node-2", LATE_POD)
    assert ECHO_PORT in _wire_ports(plan, "pod-1-1", LATE_POD)  # not in the mesh yet: plaintext
    kubelab.run_pod(plan, LATE_POD)
    took = kubelab.wait_for("enrolled", lambda: _enrolled(plan, "node-2", LATE_POD), WAIT_S)
    print(f"pod created + IP patched -> enrolled on node-2 after {took:.2f} s")
    ports = _wire_ports(plan, "pod-1-1", LATE_POD)
    assert ports.get(HBONE_PORT) and ECHO_PORT not in ports
    kubelab.delete_pod(plan, LATE_POD)
    kubelab.wait_for("unenrolled", lambda: not _enrolled(plan, "node-2", LATE_POD), WAIT_S)
    assert ECHO_PORT in _wire_ports(plan, "pod-1-1", LATE_POD)


def test_namespace_label_change_unenrols_and_enrols(kubelab_plan: LabPlan) -> None:
    plan = kubelab_plan
    kubelab.wait_for("enrolled", lambda: _enrolled(plan, "node-2", "pod-2-1"), WAIT_S)
    try:
        kubelab.in_api(plan, kube.label_namespace, mesh.MESH_NAMESPACE, {DATAPLANE_LABEL: None})
        kubelab.wait_for("unenrolled", lambda: not _enrolled(plan, "node-2", "pod-2-1"), WAIT_S)
        assert ECHO_PORT in _wire_ports(plan, "pod-1-1", "pod-2-1")
    finally:
        kubelab.in_api(plan, kube.label_namespace, mesh.MESH_NAMESPACE, {DATAPLANE_LABEL: AMBIENT})
    kubelab.wait_for("enrolled again", lambda: _enrolled(plan, "node-2", "pod-2-1"), WAIT_S)
    assert HBONE_PORT in _wire_ports(plan, "pod-1-1", "pod-2-1")


def test_service_vip_with_named_target_port_is_reachable(kubelab_plan: LabPlan) -> None:
    plan = kubelab_plan
    vip, ns = "10.96.70.7", mesh.MESH_NAMESPACE
    svc = kube.service_body(ns, "echo", vip, [(80, "echo")], {"app": "pod-2-1"})
    slice_ = kube.endpoint_slice_body(ns, "echo", {80: ECHO_PORT}, [plan.pod("pod-2-1").ip])
    kubelab.in_api(plan, kube.create, svc)
    kubelab.in_api(plan, kube.create, slice_)

    def routed() -> bool:
        return any(r["service"] == f"{ns}/echo" for r in mesh.admin_get(plan, "node-1", "/services"))

    kubelab.wait_for("service on node-1", routed, WAIT_S)
    assert _echo(plan, "pod-1-1", vip, b"via the VIP", port=80) == b"via the VIP"


def test_kubectl_apply_of_a_deny_policy_closes_a_live_connection(kubelab_plan: LabPlan) -> None:
    plan = kubelab_plan
    src, dst = plan.pod("pod-1-2"), plan.pod("pod-2-1")
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-pod-1-2", "namespace": mesh.MESH_NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"app": "pod-2-1"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [mesh.principal("pod-1-2")]}}]}],
        },
    }
    try:
        with live_connection(src.netns, dst.ip, ECHO_PORT) as proc:
            kubelab.apply(plan, [deny])
            proc.wait(timeout=10)
            assert proc.stdout is not None and proc.stdout.read().startswith("closed")
        assert _echo(plan, "pod-1-1", dst.ip, b"others still pass") == b"others still pass"
    finally:
        kubelab.kubectl(plan, "delete", "authorizationpolicy", "-n", mesh.MESH_NAMESPACE, "deny-pod-1-2")


def test_plane_admin_api_counts_the_kube_source(kubelab_plan: LabPlan) -> None:
    """The plane (--source kube) reports its informers' and the store's counters on its admin port."""
    base = f"http://{kubelab_plan.mgmt_ip}:{mesh.PLANE_METRICS_PORT}"

    def get(path: str) -> str:
        import urllib.request

        with urllib.request.urlopen(base + path, timeout=5) as resp:
            return str(resp.read().decode())

    counters = json.loads(nsx.run_in(kubelab_plan.fabric_netns, get, "/debug/counters", timeout=10))
    assert counters["kube"]["pods_lists"] >= 1 and counters["kube"]["pods_watches"] >= 1
    assert counters["kube"]["publishes"] >= 1
    # The lab's API server serves the Gateway API (its CRDs are installed): the plane listed Gateways.
    assert counters["kube"]["gateways_lists"] >= 1 and counters["kube"]["servicecidrs_lists"] >= 1
    assert counters["config"]["versions"] >= 1
    metrics = nsx.run_in(kubelab_plan.fabric_netns, get, "/metrics", timeout=10)
    assert "ambit_mgmt_config_rejected_documents_total" in metrics
