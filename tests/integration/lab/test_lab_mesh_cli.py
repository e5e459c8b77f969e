"""`ambit lab mesh` as a user runs it: the README's look-around, a second run, config errors, restarts.

One lab for the module, built and meshed through the real `ambit` command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent import netns as nsx
from agent.lab import mesh, state
from agent.lab.demo import demo_prefix
from agent.lab.plan import LabPlan
from agent.observe.metrics import ISTIO_LABELS
from tests.conftest import ambit_cli

pytestmark = pytest.mark.root


def ambit(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ambit_cli(*args, check=check, timeout=180)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabPlan, str]]:
    prefix = "u" + uuid.uuid4().hex[:4] + "-"
    saved = {k: os.environ.get(k) for k in ("AMBIT_LAB_STATE_DIR", "AMBIT_LAB_PREFIX")}
    os.environ["AMBIT_LAB_STATE_DIR"] = str(tmp_path_factory.mktemp("labstate"))
    os.environ["AMBIT_LAB_PREFIX"] = prefix
    try:
        up = ambit("lab", "up")
        first = ambit("lab", "mesh")
        loaded = state.load(prefix)
        assert loaded is not None
        yield loaded.plan, up.stderr + first.stderr
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
        "node-1: namespace",
        "node-2: namespace",
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


def test_debug_certificate_chains_trust_bundle_and_policies_in_full(lab: tuple[LabPlan, str]) -> None:
    plan, _ = lab
    certs = json.loads(ambit("debug", "certs", "--node", "node-2", "-o", "json").stdout)
    bundle = json.loads(ambit("debug", "trust-bundle", "--node", "node-2", "-o", "json").stdout)
    assert bundle and all(a["type"] == "trust anchor" for a in bundle)
    node = next(r for r in certs if r["state"] == "node")
    assert node["identity"].endswith("/node/node-2")
    for row in [r for r in certs if r["state"] in ("node", "valid")]:
        types = [c["type"] for c in row["chain"]]
        assert types[0] == "leaf" and types[-1] == "root", types
        assert row["chain"][0]["san"] == row["identity"]
        assert row["chain"][-1]["sha256"] in {a["sha256"] for a in bundle}  # verified against the bundle
    table = ambit("debug", "certs", "--node", "node-2").stdout.splitlines()
    assert table[0].split()[:3] == ["IDENTITY", "TYPE", "STATE"]
    assert any(line.split()[0] == "root" for line in table[1:])

    mesh.set_policies(plan, [mesh.allow_only("pod-2-1", ["pod-1-1"], name="full-rules")])
    try:

        def shown() -> list[dict[str, Any]]:
            rows = json.loads(ambit("debug", "policies", "--node", "node-2", "-o", "json").stdout)
            return [r for r in rows if r["name"] == "full-rules"]

        _until("the policy on node-2", lambda: bool(shown()))
        spec = shown()[0]["spec"]
        assert spec["action"] == "ALLOW" and spec["selector"] == {"app": "pod-2-1"}
        assert spec["rules"] == [
            {"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/sa-pod-1-1"]}}]}
        ]
    finally:
        mesh.set_policies(plan, [])


def test_debug_reachable_lists_every_workload_without_holding_them(lab: tuple[LabPlan, str]) -> None:
    rows = json.loads(ambit("debug", "reachable", "--node", "node-1", "-o", "json").stdout)
    assert {r["workload"] for r in rows} == {f"demo/pod-{n}-{j}" for n in (1, 2) for j in (1, 2)}
    other = next(r for r in rows if r["workload"] == "demo/pod-2-2")  # never dialled from node-1
    assert (other["node"], other["local"], other["held"]) == ("node-2", False, False)
    assert all(r["held"] for r in rows if r["local"])
    held = {
        r["workload"]
        for r in json.loads(ambit("debug", "workloads", "--node", "node-1", "-o", "json").stdout)
    }
    assert "demo/pod-2-2" not in held


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
    # The destination node knows the client workload too: it looks up the source address the HBONE connection
    # comes from (the client pod's own) to check that it belongs to the verified identity (docs/proxy.md,
    # "Source address").
    for node, reporter, want in (("node-1", "source", expected), ("node-2", "destination", expected)):
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


DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "ambit-dashboard.json"
PROM_PORT = 19090  # inside the lab's fabric namespace, so nothing else on the machine can hold it
# Variables as Grafana would set them: every instance, the destination reporter, 4 scrape intervals.
VARIABLES = {"$instance": ".*", "$plane": ".*", "$reporter": "destination", "$__rate_interval": "20s"}


def _prom_query(query: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{PROM_PORT}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:  # a bad query answers 400 with the reason
        return dict(json.loads(exc.read()))
    except OSError as exc:
        return {"status": "unreachable", "error": str(exc)}


def _query(plan: LabPlan, query: str) -> dict[str, Any]:
    result: dict[str, Any] = nsx.run_in(plan.fabric_netns, _prom_query, query, timeout=20)
    return result


def _value(plan: LabPlan, query: str) -> float | None:
    result = _query(plan, query).get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


def _until(what: str, ok: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)


def test_dashboard_queries_against_real_prometheus(lab: tuple[LabPlan, str], tmp_path: Path) -> None:
    plan, _ = lab
    agents = [f"{n.ip}:{mesh.METRICS_PORT}" for n in plan.nodes]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "ambit-agent", "static_configs": [{"targets": agents}]},
                    {
                        "job_name": "ambit-mgmt",
                        "static_configs": [{"targets": [f"{plan.mgmt_ip}:{mesh.PLANE_METRICS_PORT}"]}],
                    },
                ],
            }
        )
    )
    prometheus = nsx.popen_in(
        plan.fabric_netns,
        [
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{PROM_PORT}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    try:
        _until("3 targets up", lambda: _value(plan, "sum(up)") == 3)
        # Traffic: allowed requests, then one that policy denies.
        for _ in range(5):
            ambit("lab", "exec", "pod-1-1", "--", "curl", "-s", "http://10.244.2.2:8080/")
        mesh.set_policies(plan, [mesh.allow_only("pod-2-1", ["pod-1-1"])])
        try:
            _until(
                "the deny policy",
                lambda: (
                    ambit(
                        "lab",
                        "exec",
                        "pod-1-2",
                        "--",
                        "curl",
                        "-s",
                        "--max-time",
                        "2",
                        "http://10.244.2.2:8080/",
                        check=False,
                    ).returncode
                    != 0
                ),
            )
        finally:
            mesh.set_policies(plan, [])
        denied = 'sum(istio_tcp_connections_closed_total{reporter="destination", response_flags="DENY"})'
        _until("the denial in Prometheus", lambda: _value(plan, denied) is not None)
        time.sleep(3)  # a few more scrapes, so rate() has two points after the traffic

        dash = json.loads(DASHBOARD.read_text())
        answers: dict[str, list[Any]] = {}
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, value in VARIABLES.items():
                    expr = expr.replace(var, value)
                got = _query(plan, expr)
                assert got["status"] == "success", (panel["title"], expr, got)
                answers.setdefault(panel["title"], []).extend(got["data"]["result"])
        for title in (
            "Connections opened /s by destination",
            "Open connections",
            "Denied connections /s",
            "Bytes received (client to server) /s",
            "Connection duration (p50, p99)",
            "Connections /s by destination service",
            "Policy decisions /s by action",
            "Policy denials /s by node",
            "Config version applied by node",
            "Config version served",
            "Nodes connected",
            "CSRs /s by result",
            "BPF datapath counters /s",
            "Agent resident memory",
        ):
            assert answers[title], f"{title}: no data"
        assert float(answers["Nodes connected"][0]["value"][1]) == 2
        # The plane's per-node view: both nodes ACKed, and are at the version it serves.
        acks = _query(plan, "ambit_mgmt_node_acks_total")["data"]["result"]
        assert {r["metric"]["node"] for r in acks} == {"node-1", "node-2"}
        assert all(float(r["value"][1]) >= 1 for r in acks)
        _until(
            "both nodes at the served version",
            lambda: _value(plan, "max(ambit_mgmt_config_version) - min(ambit_mgmt_node_acked_version)") == 0,
        )
        services = {
            r["metric"].get("destination_service") for r in answers["Connections /s by destination service"]
        }
        assert "web.demo.svc.cluster.local" in services
        # One reporter: the panel's bytes are the destination's count alone, half of both ends' sum.
        pod11 = 'source_principal="spiffe://cluster.local/ns/demo/sa/sa-pod-1-1"'
        both = _value(plan, f"sum(istio_tcp_received_bytes_total{{{pod11}}})")
        one = _value(plan, f'sum(istio_tcp_received_bytes_total{{{pod11}, reporter="destination"}})')
        assert one and both == 2 * one
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=20)


def test_access_log_says_why_policy_denied(lab: tuple[LabPlan, str]) -> None:
    plan, _ = lab
    log = mesh.run_dir(plan.prefix) / "logs" / "access-node-2.jsonl"
    mesh.set_policies(plan, [mesh.allow_only("pod-2-1", ["pod-1-1"], name="only-pod-1-1")])
    try:
        url = "http://10.244.2.2:8080/"
        _until(
            "the deny policy",
            lambda: (
                ambit(
                    "lab", "exec", "pod-1-2", "--", "curl", "-s", "--max-time", "2", url, check=False
                ).returncode
                != 0
            ),
        )
    finally:
        mesh.set_policies(plan, [])
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    denied = [r for r in records if r.get("event") == "close" and r["response_flags"] == "DENY"]
    assert denied and all(r["deny_reason"] for r in denied), denied[-1:]
    assert all(
        r["deny_reason"] == "" for r in records if r.get("event") == "close" and r["response_flags"] == "-"
    )


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
