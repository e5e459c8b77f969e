"""An edge gateway on the lab: `ambit gateway` started inside a lab pod's namespace as a lab process (so
`ambit lab down` stops it). The pod is an enrolled workload, so the node agent captures the gateway's
upstream connections and carries them over HBONE with the pod's SPIFFE identity: destination policies can
admit "only from the gateway"."""

from __future__ import annotations

import sys
from pathlib import Path

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
