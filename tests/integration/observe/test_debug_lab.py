"""Each `ambit debug` view against a live admin API inside a lab node's network namespace (--node)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent import netns
from agent.lab import control
from agent.lab.plan import plan_lab

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[3]
# The admin API with static providers, as the agent will run it: loopback-only, inside the node netns.
ADMIN_PROCESS = """
import sys
import uuid
from agent.admin import AdminServer

data = {
    "workloads": [{"uid": "shop/web", "ips": ["10.244.1.2"], "node": "node-1"}],
    "services": [{"name": "shop/db", "addresses": ["10.96.0.10"], "ports": [5432]}],
    "policies": [{"name": "shop/allow-web", "action": "ALLOW"}],
    "certs": [{"identity": "spiffe://cluster.local/ns/shop/sa/web", "serial": "0a"}],
    "connections": [{"id": 1, "src": "10.244.1.2:40000", "dst": "10.244.2.2:8080"}],
    "bpf": [{"pod_ip": "10.244.1.2", "ifname": "vp1", "strict": False}],
    "config_dump": {
        "version": 9,
        "key_pem": "-----BEGIN PRIVATE KEY-----\\nMIGHAgEA\\n-----END PRIVATE KEY-----\\n",
        "join_token": "jt-lab-secret",
    },
}
server = AdminServer("127.0.0.1:15000", {k: (lambda v=v: v) for k, v in data.items()})
server.start()
print("serving", flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop()
"""
EXPECT = {
    "workloads": "shop/web",
    "services": "10.96.0.10",
    "policies": "shop/allow-web",
    "certs": "spiffe://cluster.local/ns/shop/sa/web",
    "connections": "10.244.2.2:8080",
    "bpf": "vp1",
    "config": "version",
}


@pytest.fixture(scope="module")
def lab_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # One lab for the module: a unique prefix and state dir, as tests/conftest.py's lab_prefix makes.
    prefix = "t" + uuid.uuid4().hex[:4] + "-"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AMBIT_LAB_STATE_DIR", str(tmp_path_factory.mktemp("lab")))
        env.setenv("AMBIT_LAB_PREFIX", prefix)
        yield from _admin_in_lab(prefix)


def _admin_in_lab(prefix: str) -> Iterator[str]:
    lab = control.up(plan_lab(1, 1, prefix))
    try:
        node_ns = control.netns_for(lab, "node-1")
        proc = netns.popen_in(
            node_ns,
            [sys.executable, "-c", ADMIN_PROCESS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"serving\n"
            yield prefix
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=10)
    finally:
        control.down(prefix)


def debug(prefix: str, *args: str, node: str = "node-1") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AMBIT_LAB_PREFIX"}  # --prefix must be enough
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "debug", "--node", node, "--prefix", prefix, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


@pytest.mark.parametrize("view", sorted(EXPECT))
def test_view_in_lab_node(lab_admin: str, view: str) -> None:
    table = debug(lab_admin, view)
    assert table.returncode == 0, table.stderr
    assert EXPECT[view] in table.stdout
    assert "PRIVATE KEY" not in table.stdout and "jt-lab-secret" not in table.stdout
    as_json = debug(lab_admin, view, "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    parsed = json.loads(as_json.stdout)
    assert EXPECT[view] in json.dumps(parsed)
    assert yaml.safe_load(debug(lab_admin, view, "-o", "yaml").stdout) == parsed


def test_log_level_in_lab_node(lab_admin: str) -> None:
    changed = debug(lab_admin, "log-level", "debug")
    assert changed.returncode == 0, changed.stderr
    assert "debug" in changed.stdout
    shown = debug(lab_admin, "log-level", "-o", "json")
    assert json.loads(shown.stdout) == {"level": "debug"}


def test_unreachable_agent_in_lab_node(lab_admin: str) -> None:
    proc = debug(lab_admin, "--admin", "127.0.0.1:15999", "workloads")
    assert proc.returncode == 2
    assert "cannot reach the agent admin API at 127.0.0.1:15999 in node-1" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_unknown_node_and_no_lab(lab_admin: str) -> None:
    proc = debug(lab_admin, "--admin", "127.0.0.1:15000", "workloads")
    assert proc.returncode == 0
    unknown = debug(lab_admin, "bpf", node="node-9")
    assert unknown.returncode == 2 and "unknown pod or node 'node-9'" in unknown.stderr
    no_lab = debug("zz-nolab-", "workloads")
    assert no_lab.returncode == 2 and "no lab with prefix 'zz-nolab-'" in no_lab.stderr
