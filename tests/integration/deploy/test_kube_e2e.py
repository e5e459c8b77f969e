"""`ambit mgmt --source kube --kube-bootstrap` and `ambit agent --kube-token-file`, as the chart runs them.

Real processes, the real API server, the plane with only the chart's ClusterRole: the agent joins with its
pod's token, subscribes, and `ambit debug status` shows it SYNCED; an agent presenting a pod's token of
another node exits with the plane's refusal.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.deploy.conftest import Cluster
from tests.kube_fixtures import unique
from tests.relay_fixtures import wait_until

AMBIT = [sys.executable, "-m", "agent.cli"]
TIMEOUT = 30.0


@pytest.fixture
def plane(cluster: Cluster, tmp_path: Path) -> Iterator[dict[str, int]]:
    argv = [*AMBIT, "mgmt", "--source", "kube", "--kubeconfig", str(cluster.plane_kubeconfig)]
    argv += [
        "--state-dir",
        str(tmp_path / "state"),
        "--listen",
        "127.0.0.1:0",
        "--bootstrap-listen",
        "127.0.0.1:0",
    ]
    argv += ["--admin-listen", "127.0.0.1:0", "--kube-bootstrap", f"{cluster.ns}/ambit-agent/ambit-agent"]
    argv += ["--webhook-listen", "127.0.0.1:0", "--webhook-dns", "localhost"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    ports: dict[str, int] = {}
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            for name, pattern in (("admin", r"admin on port (\d+)"), ("webhook", r"webhook on port (\d+)")):
                m = re.search(pattern, line)
                if m:
                    ports[name] = int(m.group(1))
            m = re.search(r"relay on port (\d+), bootstrap on port (\d+)", line)
            if m:
                ports["relay"], ports["bootstrap"] = int(m.group(1)), int(m.group(2))
                break
        assert {"admin", "webhook", "relay", "bootstrap"} <= set(ports), ports
        yield ports
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _agent(cluster: Cluster, ports: dict[str, int], node: str, token: Path, state: Path) -> list[str]:
    # A loopback address of its own for the data-path listeners: nothing else on this host uses it.
    listen_ip = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.{random.randint(1, 250)}"
    return [
        *AMBIT,
        "agent",
        "--node",
        node,
        "--mgmt",
        f"127.0.0.1:{ports['relay']}",
        "--bootstrap",
        f"127.0.0.1:{ports['bootstrap']}",
        "--trust-bundle",
        str(state / "ca-bundle.pem"),
        "--kube-token-file",
        str(token),
        "--no-redirect",
        "--listen-ip",
        listen_ip,
        "--admin",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--readiness",
        "127.0.0.1:0",
    ]


def _status(ports: dict[str, int]) -> dict:
    argv = [*AMBIT, "debug", "status", "--plane", f"127.0.0.1:{ports['admin']}", "-o", "json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_agent_joins_with_its_pod_token_and_syncs(
    cluster: Cluster, plane: dict[str, int], tmp_path: Path
) -> None:
    node_a, node_b = cluster.nodes
    state = tmp_path / "state"
    token = tmp_path / "token"
    token.write_text(cluster.token("ambit-agent", cluster.pod(unique("agent"), node_a)))
    agent = subprocess.Popen(_agent(cluster, plane, node_a, token, state), stderr=subprocess.PIPE, text=True)
    try:

        def synced() -> bool:
            rows = {n["node"]: n["state"] for n in _status(plane)["nodes"]}
            assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
            return rows.get(node_a) == "SYNCED"

        assert wait_until(synced, TIMEOUT)
    finally:
        agent.terminate()
        agent.wait(timeout=15)

    # A pod of the agent DaemonSet on node A cannot make its agent node B.
    token.write_text(cluster.token("ambit-agent", cluster.pod(unique("agent"), node_a)))
    out = subprocess.run(
        _agent(cluster, plane, node_b, token, state), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "PERMISSION_DENIED" in out.stderr and "Traceback" not in out.stderr
    assert token.read_text() not in out.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{plane['admin']}/debug/counters", timeout=10) as resp:
        counters = json.loads(resp.read())
    assert counters["bootstrap"]["joined"] == 1 and counters["bootstrap"]["refused_permission_denied"] == 1
    # The same port is the plane's Prometheus endpoint (istiod's 15014).
    with urllib.request.urlopen(f"http://127.0.0.1:{plane['admin']}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'ambit_mgmt_joins_total{result="joined"} 1.0' in metrics
    assert f'ambit_mgmt_node_connected{{node="{node_a}"}} 0.0' in metrics
