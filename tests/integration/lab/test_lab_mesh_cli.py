"""`ambit lab mesh` as a user runs it: the README's look-around, a second run, config errors, restarts.

One lab for the module, built and meshed through the real `ambit` command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import netns as nsx
from agent.lab import mesh, state
from agent.lab.demo import demo_prefix
from agent.lab.plan import LabPlan
from agent.observe.metrics import ISTIO_LABELS

pytestmark = pytest.mark.root


def ambit(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=180
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ambit {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabPlan, str]]:
    prefix = "u" + uuid.uuid4().hex[:4] + "-"
    saved = {k: os.environ.get(k) for k in ("AMBIT_LAB_STATE_DIR", "AMBIT_LAB_PREFIX")}
    os.environ["AMBIT_LAB_STATE_DIR"] = str(tmp_path_factory.mktemp("labstate"))
    os.environ["AMBIT_LAB_PREFIX"] = prefix
    try:
        ambit("lab", "up")
        first = ambit("lab", "mesh")
        loaded = state.load(prefix)
        assert loaded is not None
        yield loaded.plan, first.stderr
    finally:
        ambit("lab", "down", check=False)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pids(prefix: str) -> dict[str, int]:
    loaded = state.load(prefix)
    assert loaded is not None
    return {p.name: p.pid for p in loaded.processes}


def test_mesh_prints_each_step(lab: tuple[LabPlan, str]) -> None:
    _, first = lab
    for step in (
        "starting the management plane",
        "starting the agent on node-1",
        "waiting for the agent on node-2",
        "HTTP server in pod-2-1",
        "mesh ready",
    ):
        assert step in first, first


def test_readme_look_around(lab: tuple[LabPlan, str]) -> None:
    got = ambit("lab", "exec", "pod-1-1", "--", "curl", "-s", "http://10.244.2.2:8080/")
    assert got.stdout == "hello from pod-2-1\n"
    workloads = ambit("debug", "--node", "node-1", "workloads")
    assert workloads.stdout.splitlines()[0].split()[0] == "WORKLOAD" and "demo/pod-2-1" in workloads.stdout
    assert isinstance(
        json.loads(ambit("debug", "--node", "node-2", "connections", "-o", "json").stdout), list
    )


def test_second_mesh_run_keeps_what_runs(lab: tuple[LabPlan, str]) -> None:
    plan, _ = lab
    before = _pids(plan.prefix)
    again = ambit("lab", "mesh")
    assert "management plane already running" in again.stderr and "mesh ready" in again.stderr
    assert _pids(plan.prefix) == before
    assert all(mesh.running(plan.prefix, name) for name in before)
    status = json.loads(ambit("lab", "status", "-o", "json").stdout)
    assert all(r["state"].startswith("running") for r in status if r["kind"] == "process"), status


def test_config_errors_reach_the_user(lab: tuple[LabPlan, str]) -> None:
    plan, _ = lab
    assert ambit("lab", "config", "check").returncode == 0
    bad = mesh.config_dir(plan.prefix) / "broken.yaml"
    bad.write_text(
        "apiVersion: ambit.io/v1\nkind: Workload\nmetadata: {name: x, namespace: demo}\nspec: {ips: [nope]}\n"
    )
    try:
        check = ambit("lab", "config", "check", "-o", "json", check=False)
        assert check.returncode == 1
        rows = json.loads(check.stdout)
        assert rows and rows[0]["where"].startswith(f"{bad}:")
        status = json.loads(ambit("lab", "status", "-o", "json").stdout)
        config = next(r for r in status if r["kind"] == "config")
        assert config["state"].startswith("REJECTED") and "broken.yaml" in config["state"]
        assert "config REJECTED by the plane" in ambit("lab", "mesh").stderr
    finally:
        bad.unlink()
    assert ambit("lab", "config", "check").returncode == 0


def test_status_into_a_closed_pipe(lab: tuple[LabPlan, str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "lab", "status"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in out.stderr, out.stderr


def test_demo_never_takes_a_running_lab(lab: tuple[LabPlan, str]) -> None:
    plan, _ = lab
    said: list[str] = []
    chosen = demo_prefix(plan.prefix, said.append)
    assert chosen != plan.prefix and state.load(chosen) is None
    assert "stays as it is" in said[0]
    assert state.load(plan.prefix) is not None


def _scrape(plan: LabPlan, node: str) -> str:
    def get() -> str:
        with urllib.request.urlopen("http://127.0.0.1:15020/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    text: str = nsx.run_in(plan.node(node).netns, get, timeout=10)
    return text


def test_cross_node_metrics_have_istio_types_and_labels(lab: tuple[LabPlan, str]) -> None:
    plan, _ = lab
    ambit("lab", "exec", "pod-1-1", "--", "curl", "-s", "http://10.244.2.2:8080/")
    principal = "spiffe://cluster.local/ns/demo/sa/sa-"
    expected = {
        "source_workload": "pod-1-1",
        "source_canonical_service": "pod-1-1",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "demo",
        "source_principal": principal + "pod-1-1",
        "source_app": "pod-1-1",
        "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_service": "web.demo.svc.cluster.local",
        "destination_service_namespace": "demo",
        "destination_service_name": "web",
        "destination_workload": "pod-2-1",
        "destination_canonical_service": "pod-2-1",
        "destination_canonical_revision": "v1",
        "destination_workload_namespace": "demo",
        "destination_principal": principal + "pod-2-1",
        "destination_app": "pod-2-1",
        "destination_version": "v1",
        "destination_cluster": "Kubernetes",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    # The destination node never looked the client up (peers come on demand): it knows the client by its
    # verified identity (principal, hence namespace) only, and says "unknown" for the rest, as Istio does.
    derived_source = {k: "unknown" for k in expected if k.startswith("source_")} | {
        "source_principal": principal + "pod-1-1",
        "source_workload_namespace": "demo",
    }
    for node, reporter, want in (
        ("node-1", "source", expected),
        ("node-2", "destination", expected | derived_source),
    ):
        families = list(text_string_to_metric_families(_scrape(plan, node)))
        types = {f.name: f.type for f in families}
        for name in (
            "istio_tcp_connections_opened",
            "istio_tcp_connections_closed",
            "istio_tcp_sent_bytes",
            "istio_tcp_received_bytes",
        ):
            assert types[name] == "counter", (node, name)
            samples = [s for f in families if f.name == name for s in f.samples if s.name == name + "_total"]
            ours = [
                s.labels
                for s in samples
                if s.labels.get("source_principal") == principal + "pod-1-1"
                and s.labels.get("destination_workload") == "pod-2-1"
            ]
            assert ours, (node, name, [s.labels for s in samples])
            assert set(ours[0]) == set(ISTIO_LABELS), (node, name)
            assert ours[0] == {"reporter": reporter, **want}, (node, name)
        assert types["ambit_tcp_connection_duration_seconds"] == "histogram"
        assert types["ambit_bpf_counter"] == "counter" and types["ambit_engine_counter"] == "counter"
        assert "process_cpu_seconds" in types and "ambit_build_info" in types
        assert not [n for n in types if n.endswith("_created") or n.startswith("ambit_process_")]


def _exited(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        try:  # our own child: reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            if "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]:
                return True
        time.sleep(0.05)
    return False


TRAFFIC = """
import socket, sys, time
ok = fail = 0
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        with socket.create_connection(("10.244.2.2", 8080), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            ok += b"hello" in s.recv(4096)
    except OSError:
        fail += 1
        time.sleep(0.05)
print(ok, fail)
"""


def test_agent_restarts_ten_times_under_traffic(lab: tuple[LabPlan, str]) -> None:
    plan, _ = lab
    mgmt_state = mesh.run_dir(plan.prefix) / "mgmt"
    traffic = nsx.popen_in(
        plan.pod("pod-1-1").netns,
        [sys.executable, "-c", TRAFFIC, "600"],
        stdout=subprocess.PIPE,
        text=True,
    )
    stop_times = []
    try:
        for _ in range(10):
            pid = mesh.running(plan.prefix, "agent-node-2")
            assert pid
            started = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            # It exits by itself on SIGTERM (the bound is only so a hang fails instead of blocking).
            assert _exited(pid, within=20), "agent did not exit on SIGTERM"
            stop_times.append(time.monotonic() - started)
            mesh.start_agent(plan, "node-2", mgmt_state, lambda _: None)
            mesh.wait_agents_ready(plan)  # every listener bound, first config applied
        # Traffic flows again through the last agent.
        got = ambit(
            "lab", "exec", "pod-1-1", "--", "curl", "-s", "--max-time", "5", "http://10.244.2.2:8080/"
        )
        assert got.stdout == "hello from pod-2-1\n"
    finally:
        traffic.send_signal(signal.SIGKILL)
        traffic.wait(timeout=10)
    log = mesh.run_dir(plan.prefix) / "logs" / "agent-node-2.log"
    assert "Address already in use" not in log.read_text()
    print(f"SIGTERM to exit, 10 restarts: max {max(stop_times):.2f} s, mean {sum(stop_times) / 10:.2f} s")
