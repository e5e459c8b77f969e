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
from agent.lab import control, fabric, state
from agent.lab.plan import LabPlan
from agent.redirect.marks import HBONE_PORT
from agent.redirect.pins import lab_pin_dir
from api.resources.workload import DATAPLANE_LABEL

MESH_NAMESPACE = "demo"
TRUST_DOMAIN = "cluster.local"
RELAY_PORT = 15012
BOOTSTRAP_PORT = 15013
PLANE_METRICS_PORT = 15014
METRICS_PORT = 15020
READY_PORT = 15021
ADMIN_PORT = 15000
APP_PORT = 8080
SERVICE_NAME = "web"
SERVICE_VIP = "10.96.0.10"


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
                        "labels": {"app": pod.name, "version": "v1"}
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
    # A Service in front of the README's HTTP server: a VIP to dial, and the destination_service of metrics.
    docs.append(
        {
            "apiVersion": "ambit.io/v1",
            "kind": "Service",
            "metadata": {"name": SERVICE_NAME, "namespace": MESH_NAMESPACE},
            "spec": {
                "addresses": [SERVICE_VIP],
                "ports": [{"port": 80, "targetPort": APP_PORT, "name": "http"}],
                "selector": {"app": app_pod(plan)},
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


def _wait(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    log: Path | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Until ready(); a process that exits meanwhile (`alive` false) fails at once, with its log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if alive is not None and not alive():
            raise UsageError(f"{what} exited before it was ready{_tail(log)}")
        time.sleep(0.1)
    raise UsageError(f"{what} not ready after {timeout:.0f} s{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])


def running(prefix: str, name: str) -> int:
    """The pid of lab process `name` if it is alive, else 0 (so a second `lab mesh` keeps what runs)."""
    lab = state.load(prefix)
    for proc in lab.processes if lab else []:
        if proc.name == name and proc.pid in fabric.pids_in_netns(proc.netns):
            return proc.pid
    return 0


def config_dir(prefix: str) -> Path:
    return run_dir(prefix) / "config"


def config_problems(directory: str | Path) -> list[dict[str, str]]:
    """The documents the plane would reject in `directory` (empty when it takes them all), as
    `where`/`reason` rows (the plane skips each of them and applies the rest)."""
    from mgmt.store import ConfigLoadError, read_config

    try:
        _, errors = read_config(Path(directory))
    except ConfigLoadError as exc:  # no such directory
        errors = exc.errors
    return [{"where": e.where, "reason": e.reason} for e in errors]


def status_rows(prefix: str) -> list[dict[str, str]]:
    """A row for the mesh config, when the lab runs a mesh: `lab status` shows config errors too."""
    directory = config_dir(prefix)
    if not directory.is_dir():
        return []
    problems = config_problems(directory)
    verdict = "ok" if not problems else f"REJECTED: {problems[0]['where']}: {problems[0]['reason']}"
    if len(problems) > 1:
        verdict += f" (+{len(problems) - 1} more, see `ambit lab config check`)"
    return [{"kind": "config", "name": "mesh", "netns": str(directory), "state": verdict}]


def _report_config(prefix: str, progress: Callable[[str], None]) -> None:
    problems = config_problems(config_dir(prefix))
    for p in problems:
        progress(f"config REJECTED by the plane: {p['where']}: {p['reason']}")
    if problems:
        progress(
            "the plane applies the other documents and keeps the last good version of these objects; "
            "fix the file(s), then `ambit lab config check`"
        )


def start_plane(plan: LabPlan, progress: Callable[[str], None]) -> Path:
    rd = run_dir(plan.prefix)
    mgmt_state = rd / "mgmt"
    mgmt_state.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = rd / "config"
    if not config.exists():
        write_config(plan)
    log = rd / "logs" / "mgmt.log"
    from agent.lab import kubelab  # kubelab builds on this module

    bundle = mgmt_state / "ca-bundle.pem"
    pid = running(plan.prefix, "mgmt")
    if pid:
        progress(f"management plane already running (pid {pid})")
        return mgmt_state
    source = "the lab's API server" if kubelab.active(plan.prefix) else config
    progress(f"starting the management plane on {plan.mgmt_ip}:{RELAY_PORT} (config from {source})")
    control.start_process(
        plan.prefix,
        "mgmt",
        plan.fabric_netns,
        _ambit(
            "mgmt",
            # A lab brought up with --kube reads its config from the lab's API server instead.
            *(kubelab.plane_source_args(plan.prefix) or ["--config-dir", str(config)]),
            "--state-dir",
            str(mgmt_state),
            "--trust-domain",
            TRUST_DOMAIN,
            "--listen",
            f"{plan.mgmt_ip}:{RELAY_PORT}",
            "--bootstrap-listen",
            f"{plan.mgmt_ip}:{BOOTSTRAP_PORT}",
            "--admin-listen",
            f"{plan.mgmt_ip}:{PLANE_METRICS_PORT}",
        ),
        log,
    )
    _wait(
        "management plane",
        lambda: bundle.exists() and _listening(plan.fabric_netns, plan.mgmt_ip, RELAY_PORT),
        30,
        log,
        alive=lambda: bool(running(plan.prefix, "mgmt")),
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


def join_token(mgmt_state: Path, node: str, gateway: str = "") -> Path:
    """A fresh one-time token for `node` (or for Gateway `gateway`, then `node` names the file), in a 0600
    file only the agent (gateway) reads."""
    subject = ["--gateway", gateway] if gateway else ["--node", node]
    out = subprocess.run(
        _ambit("mgmt", "token", "--state-dir", str(mgmt_state), *subject, "--ttl", "10m"),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise UsageError(f"join token for {gateway or node}: {out.stderr.strip() or out.stdout.strip()}")
    path = mgmt_state.parent / "tokens" / f"{node}.token"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(out.stdout.strip() + "\n")
    return path


def start_agent(plan: LabPlan, node_name: str, mgmt_state: Path, progress: Callable[[str], None]) -> None:
    node = plan.node(node_name)
    rd = run_dir(plan.prefix)
    pid = running(plan.prefix, f"agent-{node.name}")
    if pid:
        progress(f"agent on {node.name} already running (pid {pid})")
        return
    token = join_token(mgmt_state, node.name)
    log = rd / "logs" / f"agent-{node.name}.log"
    progress(f"starting the agent on {node.name} ({node.ip})")
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


def wait_agents_ready(
    plan: LabPlan, timeout: float = 60.0, progress: Callable[[str], None] | None = None
) -> None:
    rd = run_dir(plan.prefix)
    for node in plan.nodes:
        log = rd / "logs" / f"agent-{node.name}.log"
        if progress is not None:
            progress(f"waiting for the agent on {node.name}: join, first config, BPF programs")
        _wait(
            f"agent on {node.name}",
            lambda n=node.netns: _agent_ready(n),  # type: ignore[misc]
            timeout,
            log,
            alive=lambda n=node.name: bool(running(plan.prefix, f"agent-{n}")),  # type: ignore[misc]
        )


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


def start_http_server(plan: LabPlan, pod_name: str, progress: Callable[[str], None] | None = None) -> str:
    """An HTTP server on pod_name:APP_PORT, as a lab process; kept if already running. Returns its URL."""
    pod = plan.pod(pod_name)
    url = f"http://{pod.ip}:{APP_PORT}/"
    name = f"http-{pod.name}"
    if running(plan.prefix, name):
        return url
    root = run_dir(plan.prefix) / "www"
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text(f"hello from {pod.name}\n")
    argv = [sys.executable, "-m", "http.server", str(APP_PORT), "--bind", pod.ip, "--directory", str(root)]
    log = run_dir(plan.prefix) / "logs" / f"{name}.log"
    if progress is not None:
        progress(f"HTTP server in {pod.name}: {url}")
    control.start_process(plan.prefix, name, pod.netns, argv, log)
    wait_listening(pod.netns, pod.ip, APP_PORT, f"HTTP server in {pod.name}")
    return url


def app_pod(plan: LabPlan) -> str:
    """The pod the README's example talks to: pod-2-1, or the last node's first pod on a smaller lab."""
    names = {p.name for p in plan.pods()}
    return "pod-2-1" if "pod-2-1" in names else plan.nodes[-1].pods[0].name


def up(
    plan: LabPlan,
    progress: Callable[[str], None],
    policies: list[dict[str, Any]] | None = None,
    app: bool = False,
) -> None:
    """Start the plane and every agent on a lab that is up; returns once every agent is ready.

    Idempotent: what already runs is kept, and the config directory is written only when it is new or
    `policies` are given (a second `ambit lab mesh` keeps the operator's edits)."""
    control.require(plan.prefix)
    if policies is not None or not config_dir(plan.prefix).is_dir():
        write_config(plan, policies)
    mgmt_state = start_plane(plan, progress)
    _report_config(plan.prefix, progress)
    for node in plan.nodes:
        start_agent(plan, node.name, mgmt_state, progress)
    wait_agents_ready(plan, progress=progress)
    if app:
        start_http_server(plan, app_pod(plan), progress)
    progress(
        f"mesh ready: {len(plan.nodes)} agents, HBONE on :{HBONE_PORT}, config in {config_dir(plan.prefix)}"
    )
