"""`make lab`: the project's main job on one machine, narrated step by step.

Brings up 2 nodes x 2 pods, the management plane and one agent per node; pod-2-1 serves HTTP and only
pod-1-1's identity may reach it. Shows an allowed request carried over mTLS (HBONE), the agents' record of
both SPIFFE identities, a capture of the node link in which the request never appears in clear, and a
request from pod-1-2 that the destination node denies. Tears everything down.
"""

from __future__ import annotations

import json
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent import netns as nsx
from agent.errors import UsageError
from agent.lab import control, fabric, mesh, state
from agent.lab.capture import Capture
from agent.lab.control import Progress
from agent.lab.plan import LabPlan, plan_lab
from agent.output import render
from agent.redirect.marks import HBONE_PORT

SERVER_POD = "pod-2-1"
ALLOWED_POD = "pod-1-1"
DENIED_POD = "pod-1-2"


def http_get(url: str, canary: str) -> tuple[int, str]:
    """Runs inside a pod: (status, body) or (0, error)."""
    req = urllib.request.Request(url, headers={"X-Canary": canary})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


def _request(plan: LabPlan, src: str, canary: str) -> tuple[int, str]:
    url = f"http://{plan.pod(SERVER_POD).ip}:{mesh.APP_PORT}/"
    result: tuple[int, str] = nsx.run_in(plan.pod(src).netns, http_get, url, canary, timeout=20)
    return result


def _access_records(plan: LabPlan, node: str) -> list[dict[str, Any]]:
    path = mesh.run_dir(plan.prefix) / "logs" / f"access-{node}.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == "close"]


def _steps(plan: LabPlan, progress: Progress) -> list[str]:
    """Run the walk-through; returns the list of failed expectations (empty when all went as designed)."""
    failures: list[str] = []
    mesh.up(plan, progress, policies=[mesh.allow_only(SERVER_POD, [ALLOWED_POD])])
    mesh.start_http_server(plan, SERVER_POD)
    progress(f"policy: only {mesh.principal(ALLOWED_POD)} may reach {SERVER_POD}")

    src_node = plan.node(plan.pod(ALLOWED_POD).node)
    capture = Capture(plan.fabric_netns, src_node.fabric_ifname)
    capture.start()
    canary = "ambit-canary-" + secrets.token_hex(8)
    status, body = _request(plan, ALLOWED_POD, canary)
    progress(f"{ALLOWED_POD} -> {SERVER_POD}: HTTP {status} {body.strip()!r}")
    if status != 200:
        failures.append(f"allowed request failed: {status} {body}")
    status, body = _request(plan, DENIED_POD, canary)
    progress(
        f"{DENIED_POD} -> {SERVER_POD}: {'HTTP ' + str(status) if status else 'refused'} ({body.strip()})"
    )
    if status != 0:
        failures.append(f"denied request got through: HTTP {status}")
    report = capture.stop(canary.encode(), {HBONE_PORT, mesh.APP_PORT, mesh.RELAY_PORT})
    ports = ", ".join(f"{port}: {n}" for port, n in sorted(report.ports.items()))
    progress(
        f"capture on {src_node.name}'s link: {report.tcp_packets} TCP packets by server port ({ports}); "
        f"canary seen in clear {report.needle_hits} times"
    )
    if report.needle_hits or mesh.APP_PORT in report.ports:
        failures.append("pod traffic crossed the node link in clear")
    if not report.ports.get(HBONE_PORT):
        failures.append(f"no HBONE (:{HBONE_PORT}) traffic on the node link")

    server_node = plan.pod(SERVER_POD).node
    rows = [
        {
            "node": server_node,
            "source": r.get("source_principal", ""),
            "destination": r.get("destination_principal", "") or r.get("destination_workload", ""),
            "policy": r.get("policy", ""),
            "flags": r.get("response_flags", ""),
            "bytes": f"{r.get('bytes_sent', 0)}/{r.get('bytes_received', 0)}",
            "reason": r.get("deny_reason", ""),
        }
        for r in _access_records(plan, server_node)
    ]
    print(render(rows, "table", ["node", "source", "destination", "policy", "flags", "bytes", "reason"]))
    if not any(r["source"].endswith(mesh.principal(ALLOWED_POD)) for r in rows):
        failures.append(f"{server_node}'s access log lacks the allowed connection's source identity")
    if not any(r["flags"] == "DENY" for r in rows):
        failures.append(f"{server_node}'s access log lacks the denied connection")
    return failures


def demo_prefix(requested: str, progress: Progress) -> str:
    """The demo removes the lab it builds at the end, so it must never run on a lab it did not create:
    when `requested` is taken (state file or namespaces), it takes the first free `demoN-` prefix."""
    for prefix in [requested, *(f"demo{i}-" for i in range(1, 10))]:
        if state.load(prefix) is None and not fabric.existing_netns(prefix):
            if prefix != requested:
                progress(
                    f"a lab with prefix {requested!r} is up and stays as it is; the demo uses {prefix!r}"
                )
            return prefix
    raise UsageError(f"prefix {requested!r} and demo1- ... demo9- are all in use: pass a free --prefix")


def run_demo(prefix: str, progress: Progress, kube: bool = False) -> int:
    """`kube`: workloads and the policy come from a real API server (agent/lab/kubedemo.py)."""
    prefix = demo_prefix(prefix, progress)
    plan = plan_lab(2, 2, prefix)
    lab = control.up(plan, progress)
    try:
        print(render(control.status_rows(lab), "table", ["kind", "name", "node", "ip", "netns", "state"]))
        if kube:
            from agent.lab import kubedemo, kubelab

            kubelab.up(plan, progress)
            failures = kubedemo.steps(plan, progress)
        else:
            failures = _steps(plan, progress)
    except Exception as exc:
        progress(f"demo failed: {exc}")
        _show_logs(plan)
        return 1
    finally:
        control.down(prefix, progress)
    for failure in failures:
        progress(f"UNEXPECTED: {failure}")
    if not failures:
        progress("demo complete: mTLS traffic allowed, unauthorized connection denied, nothing in clear")
    return 1 if failures else 0


def _show_logs(plan: LabPlan) -> None:
    logs = mesh.run_dir(plan.prefix) / "logs"
    for log in sorted(logs.glob("*.log")) if logs.exists() else []:
        tail = Path(log).read_text(errors="replace").splitlines()[-10:]
        print(f"--- {log.name} (last {len(tail)} lines)", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
