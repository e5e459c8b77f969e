"""An edge gateway on the lab, as a lab process (so `ambit lab down` stops it), in one of two modes:

- `start`: from a config directory, inside a lab pod's namespace. The pod is an enrolled workload, so the
  node agent captures the gateway's upstream connections and carries them over HBONE with the pod's identity.
- `start_from_plane`: a client of the lab's management plane, in a node's namespace (outside every pod, so
  nothing captures it): it joins with a token minted for its Gateway, gets the Gateway's SVID by CSR, pulls
  the Gateway's config from the plane's config directory over the relay and speaks HBONE itself, so
  destination policies can admit "only from the gateway" by its own SPIFFE id."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent.errors import UsageError
from agent.lab import control, mesh


def start(prefix: str, pod_name: str, config_dir: Path, port: int, audit_log: Path | None = None) -> Path:
    """Starts the gateway in `pod_name` serving `config_dir`; returns its audit log once `port` accepts."""
    lab = control.require(prefix)
    pod = lab.plan.pod(pod_name)
    logs = mesh.run_dir(prefix) / "logs"
    audit = audit_log or logs / f"gateway-{pod.name}-audit.jsonl"
    argv = [
        sys.executable,
        "-m",
        "agent.cli",
        "gateway",
        "--config-dir",
        str(config_dir),
        "--audit-log",
        str(audit),
    ]
    control.start_process(prefix, f"gateway-{pod.name}", pod.netns, argv, logs / f"gateway-{pod.name}.log")
    mesh.wait_listening(pod.netns, pod.ip, port, f"gateway in {pod.name}", timeout=30)
    return audit


def start_from_plane(prefix: str, node_name: str, gateway: str, port: int) -> Path:
    """Starts the gateway serving Gateway `gateway` (namespace/name, a document of the plane's config) on
    `node_name`; returns its audit log once `port` accepts on the node's address."""
    lab = control.require(prefix)
    node = lab.plan.node(node_name)
    rd = mesh.run_dir(prefix)
    mgmt_state = rd / "mgmt"
    label = "gateway-" + gateway.replace("/", "-")
    _wait_recorded(mgmt_state, gateway)
    token = mesh.join_token(mgmt_state, label, gateway=gateway)
    logs = rd / "logs"
    audit = logs / f"{label}-audit.jsonl"
    argv = [
        sys.executable,
        "-m",
        "agent.cli",
        "gateway",
        "--plane",
        f"{lab.plan.mgmt_ip}:{mesh.RELAY_PORT}",
        "--bootstrap",
        f"{lab.plan.mgmt_ip}:{mesh.BOOTSTRAP_PORT}",
        "--trust-bundle",
        str(mgmt_state / "ca-bundle.pem"),
        "--join-token-file",
        str(token),
        "--gateway",
        gateway,
        "--audit-log",
        str(audit),
        "--bundle-refresh",
        "5",
    ]
    control.start_process(prefix, label, node.netns, argv, logs / f"{label}.log")
    mesh.wait_listening(node.netns, node.ip, port, f"gateway {gateway} on {node.name}", timeout=30)
    return audit


def _wait_recorded(mgmt_state: Path, gateway: str, timeout: float = 10.0) -> None:
    """The plane names its config's Gateways in its state dir once it took a version with them; a Gateway
    written just now into the config directory needs a moment (the plane polls the files)."""
    from mgmt.join_tokens import GATEWAYS_FILE, recorded_nodes

    deadline = time.monotonic() + timeout
    while gateway not in (recorded_nodes(mgmt_state, GATEWAYS_FILE) or ()):
        if time.monotonic() > deadline:
            raise UsageError(f"the lab's plane took no config with Gateway {gateway} within {timeout:.0f} s")
        time.sleep(0.1)
