"""The mesh on top of a lab: the management plane in the fabric namespace, one agent per node namespace.

The lab's mesh config (one Namespace enrolled in ambient mode, a Node and a Workload per pod, optional
policies) is written as YAML into the plane's config directory; the plane watches it, so editing a file
there changes the running mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from agent import netns as nsx
from agent.errors import UsageError
from agent.lab import control, state
from agent.lab.plan import LabPlan
from agent.redirect.marks import HBONE_PORT
from agent.redirect.pins import lab_pin_dir
from api.resources.workload import DATAPLANE_LABEL

MESH_NAMESPACE = "demo"
TRUST_DOMAIN = "cluster.local"
RELAY_PORT = 15012
BOOTSTRAP_PORT = 15013
READY_PORT = 15021
ADMIN_PORT = 15000
APP_PORT = 8080


def run_dir(prefix: str) -> Path:
    return state.state_dir() / f"mesh-{prefix.rstrip('-')}"


def service_account(pod: str) -> str:
    return f"sa-{pod}"


def principal(pod: str) -> str:
    """Istio-style principal (no scheme) of a lab pod's workload."""
    return f"{TRUST_DOMAIN}/ns/{MESH_NAMESPACE}/sa/{service_account(pod)}"


def mesh_documents(plan: LabPlan, opted_out: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The lab's mesh; pods in `opted_out` carry `ambit.io/dataplane-mode: none` (not captured, plaintext)."""
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "ambit.io/v1",
            "kind": "Namespace",
            "metadata": {"name": MESH_NAMESPACE, "labels": {"ambit.io/dataplane-mode": "ambient"}},
        }
    ]
    for node in plan.nodes:
        docs.append(
            {
                "apiVersion": "ambit.io/v1",
                "kind": "Node",
                "metadata": {"name": node.name},
                "spec": {"addresses": [node.ip], "podCIDRs": [node.pod_cidr]},
            }
        )
        for pod in node.pods:
            docs.append(
                {
                    "apiVersion": "ambit.io/v1",
                    "kind": "Workload",
                    "metadata": {
                        "name": pod.name,
                        "namespace": MESH_NAMESPACE,
                        "labels": {"app": pod.name}
                        | ({DATAPLANE_LABEL: "none"} if pod.name in opted_out else {}),
                    },
                    "spec": {
                        "serviceAccount": service_account(pod.name),
                        "node": node.name,
                        "ips": [pod.ip],
                        "ports": [APP_PORT],
                    },
                }
            )
    return docs


def allow_only(target_pod: str, sources: list[str], name: str = "") -> dict[str, Any]:
    """An ALLOW policy on one pod: only the listed pods' identities may connect (any port)."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name or f"{target_pod}-allow", "namespace": MESH_NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"app": target_pod}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [principal(p) for p in sources]}}]}],
        },
    }


def write_config(plan: LabPlan, extra: list[dict[str, Any]] | None = None) -> Path:
    config = run_dir(plan.prefix) / "config"
    config.mkdir(parents=True, exist_ok=True)
    _write_yaml(config / "mesh.yaml", mesh_documents(plan))
    _write_yaml(config / "policies.yaml", list(extra or []))
    return config


def _write_yaml(path: Path, docs: list[dict[str, Any]]) -> None:
    # Write then rename, so the plane's watcher never sees a half-written file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    tmp.replace(path)


def set_opted_out(plan: LabPlan, pods: frozenset[str]) -> bool:
    """Take `pods` out of the mesh (and every other pod back in); False when nothing changes."""
    return _replace(run_dir(plan.prefix) / "config" / "mesh.yaml", mesh_documents(plan, pods))


def set_policies(plan: LabPlan, docs: list[dict[str, Any]]) -> bool:
    """Replace the lab's policies; False when they are already these (the plane makes no new version)."""
    return _replace(run_dir(plan.prefix) / "config" / "policies.yaml", docs)


def _replace(path: Path, docs: list[dict[str, Any]]) -> bool:
    if path.exists() and path.read_text() == yaml.safe_dump_all(docs, sort_keys=False):
        return False
    _write_yaml(path, docs)
    return True


def _ambit(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def _wait(what: str, ready: Callable[[], bool], timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise UsageError(f"{what} not ready after {timeout:.0f} s{tail}")


def start_plane(plan: LabPlan, progress: Callable[[str], None]) -> Path:
    rd = run_dir(plan.prefix)
    mgmt_state = rd / "mgmt"
    mgmt_state.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = rd / "config"
    if not config.exists():
        write_config(plan)
    log = rd / "logs" / "mgmt.log"
    progress(f"management plane on {plan.mgmt_ip}:{RELAY_PORT} (config {config})")
    control.start_process(
        plan.prefix,
        "mgmt",
        plan.fabric_netns,
        _ambit(
            "mgmt",
            "--config-dir",
            str(config),
            "--state-dir",
            str(mgmt_state),
            "--trust-domain",
            TRUST_DOMAIN,
            "--listen",
            f"{plan.mgmt_ip}:{RELAY_PORT}",
            "--bootstrap-listen",
            f"{plan.mgmt_ip}:{BOOTSTRAP_PORT}",
        ),
        log,
    )
    bundle = mgmt_state / "ca-bundle.pem"
    _wait(
        "management plane",
        lambda: bundle.exists() and _listening(plan.fabric_netns, plan.mgmt_ip, RELAY_PORT),
        30,
        log,
    )
    return mgmt_state


def _listening(netns_name: str, ip: str, port: int) -> bool:
    return bool(nsx.run_in(netns_name, _tcp_open, ip, port, timeout=5))


def wait_listening(netns_name: str, ip: str, port: int, what: str, timeout: float = 10.0) -> None:
    """Return once something accepts TCP on ip:port inside `netns_name` (UsageError after `timeout`)."""
    _wait(what, lambda: _listening(netns_name, ip, port), timeout)


def start_echo_server(plan: LabPlan, pod_name: str, port: int) -> None:
    """A TCP echo server in a pod, as a lab process (`down` stops it); returns once it accepts."""
    pod = plan.pod(pod_name)
    argv = [sys.executable, "-c", f"from agent.lab.probe import serve_echo; serve_echo({port})"]
    log = run_dir(plan.prefix) / "logs" / f"echo-{pod.name}.log"
    control.start_process(plan.prefix, f"echo-{pod.name}", pod.netns, argv, log)
    wait_listening(pod.netns, pod.ip, port, f"echo server in {pod.name}")


def _tcp_open(ip: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((ip, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def join_token(mgmt_state: Path, node: str) -> Path:
    """A fresh one-time token for `node`, in a 0600 file only the agent reads."""
    out = subprocess.run(
        _ambit("mgmt", "token", "--state-dir", str(mgmt_state), "--node", node, "--ttl", "10m"),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise UsageError(f"join token for {node}: {out.stderr.strip() or out.stdout.strip()}")
    path = mgmt_state.parent / "tokens" / f"{node}.token"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(out.stdout.strip() + "\n")
    return path


def start_agent(plan: LabPlan, node_name: str, mgmt_state: Path, progress: Callable[[str], None]) -> None:
    node = plan.node(node_name)
    rd = run_dir(plan.prefix)
    token = join_token(mgmt_state, node.name)
    log = rd / "logs" / f"agent-{node.name}.log"
    progress(f"agent on {node.name} ({node.ip})")
    control.start_process(
        plan.prefix,
        f"agent-{node.name}",
        node.netns,
        _ambit(
            "agent",
            "--node",
            node.name,
            "--mgmt",
            f"{plan.mgmt_ip}:{RELAY_PORT}",
            "--bootstrap",
            f"{plan.mgmt_ip}:{BOOTSTRAP_PORT}",
            "--trust-bundle",
            str(mgmt_state / "ca-bundle.pem"),
            "--join-token-file",
            str(token),
            "--trust-domain",
            TRUST_DOMAIN,
            "--listen-ip",
            node.ip,
            "--pin-dir",
            str(lab_pin_dir(plan.prefix, node.name)),
            "--access-log",
            str(rd / "logs" / f"access-{node.name}.jsonl"),
            "--audit-log",
            str(rd / "logs" / f"audit-{node.name}.jsonl"),
            # A lab is small and short-lived: poll the trust bundle often so root rotations show quickly.
            "--bundle-refresh",
            "5",
        ),
        log,
    )


def wait_agents_ready(plan: LabPlan, timeout: float = 60.0) -> None:
    rd = run_dir(plan.prefix)
    for node in plan.nodes:
        log = rd / "logs" / f"agent-{node.name}.log"
        _wait(f"agent on {node.name}", lambda n=node.netns: _agent_ready(n), timeout, log)  # type: ignore[misc]


def _agent_ready(netns_name: str) -> bool:
    return bool(nsx.run_in(netns_name, _http_ok, f"http://127.0.0.1:{READY_PORT}/healthz/ready", timeout=5))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def admin_get(plan: LabPlan, node: str, path: str) -> Any:
    netns_name = plan.node(node).netns
    body = nsx.run_in(netns_name, _http_get, f"http://127.0.0.1:{ADMIN_PORT}{path}", timeout=10)
    return json.loads(body)


def _http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def up(plan: LabPlan, progress: Callable[[str], None], policies: list[dict[str, Any]] | None = None) -> None:
    """Start the plane and every agent on a lab that is up; returns once every agent is ready."""
    control.require(plan.prefix)
    write_config(plan, policies)
    mgmt_state = start_plane(plan, progress)
    for node in plan.nodes:
        start_agent(plan, node.name, mgmt_state, progress)
    wait_agents_ready(plan)
    progress(f"mesh ready: {len(plan.nodes)} agents, HBONE on :{HBONE_PORT}")
