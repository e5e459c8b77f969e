"""`make lab KUBE=1`: the lab demo with its workloads and policy in a real Kubernetes API server.

The mesh comes up with no policy: pod-1-2 reaches pod-2-1. Then `kubectl apply` of an Istio
AuthorizationPolicy (only pod-1-1's identity may reach pod-2-1) changes live traffic: pod-1-2 is refused
from then on, pod-1-1 still gets through, over HBONE only (a capture of the node link never sees the
request's canary in clear).
"""

from __future__ import annotations

import secrets
import time

import yaml

from agent.lab import demo, kubelab, mesh
from agent.lab.capture import Capture
from agent.lab.control import Progress
from agent.lab.plan import LabPlan
from agent.redirect.marks import HBONE_PORT

POLICY_TIMEOUT_S = 20.0


def steps(plan: LabPlan, progress: Progress) -> list[str]:
    """The walk-through; returns the failed expectations (empty when all went as designed)."""
    failures: list[str] = []
    mesh.up(plan, progress)  # also starts the HTTP server on pod-2-1 (demo.SERVER_POD)
    progress(kubelab.kubectl(plan, "get", "pods", "-n", mesh.MESH_NAMESPACE, "-o", "wide").rstrip())
    canary = "ambit-canary-" + secrets.token_hex(8)
    status, body = demo._request(plan, demo.DENIED_POD, canary)
    progress(f"no policy yet: {demo.DENIED_POD} -> {demo.SERVER_POD}: HTTP {status} {body.strip()!r}")
    if status != 200:
        failures.append(f"request without any policy failed: {status} {body}")
    policy = mesh.allow_only(demo.SERVER_POD, [demo.ALLOWED_POD])
    progress("kubectl apply -f - <<EOF\n" + yaml.safe_dump(policy, sort_keys=False) + "EOF")
    progress(kubelab.apply(plan, [policy]).strip())
    started = time.monotonic()
    while True:
        status, body = demo._request(plan, demo.DENIED_POD, canary)
        if status == 0 or time.monotonic() - started > POLICY_TIMEOUT_S:
            break
        time.sleep(0.2)
    took = time.monotonic() - started
    progress(f"{demo.DENIED_POD} -> {demo.SERVER_POD}: {'HTTP ' + str(status) if status else 'refused'} "
             f"({body.strip()}), {took:.1f} s after the apply")  # fmt: skip
    if status != 0:
        failures.append(f"the applied policy did not deny {demo.DENIED_POD} within {POLICY_TIMEOUT_S:.0f} s")
    src_node = plan.node(plan.pod(demo.ALLOWED_POD).node)
    capture = Capture(plan.fabric_netns, src_node.fabric_ifname)
    capture.start()
    status, body = demo._request(plan, demo.ALLOWED_POD, canary)
    report = capture.stop(canary.encode(), {HBONE_PORT, mesh.APP_PORT})
    hbone = report.ports.get(HBONE_PORT, 0)
    progress(f"{demo.ALLOWED_POD} -> {demo.SERVER_POD}: HTTP {status} {body.strip()!r}; on {src_node.name}'s "
             f"link {hbone} HBONE packets, canary in clear {report.needle_hits} times")  # fmt: skip
    if status != 200:
        failures.append(f"allowed request failed after the apply: {status} {body}")
    if report.needle_hits or mesh.APP_PORT in report.ports or not report.ports.get(HBONE_PORT):
        failures.append("the allowed request did not cross the node link as HBONE only")
    return failures
