"""`ambit lab up --kube` through the real command: the API server runs in the fabric and holds the lab's
pods; `ambit lab down` stops it with the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from agent.lab import kubelab, state

pytestmark = pytest.mark.root


def _ambit(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, f"ambit {' '.join(args)}: {out.stdout}\n{out.stderr}"
    return out.stdout


def test_lab_up_kube_status_down(lab_prefix: str) -> None:
    pids: list[int] = []
    try:
        _ambit("lab", "up", "--kube")
        lab = state.load(lab_prefix)
        assert lab is not None
        pids = [p.pid for p in lab.processes if p.name in ("etcd", "kube-apiserver")]
        assert len(pids) == 2
        status = json.loads(_ambit("lab", "status", "-o", "json"))
        assert {r["name"] for r in status if r["kind"] == "process"} >= {"etcd", "kube-apiserver"}
        pods = json.loads(kubelab.kubectl(lab.plan, "get", "pods", "-n", "demo", "-o", "json"))["items"]
        assert sorted(
            (p["metadata"]["name"], p["status"]["podIP"], p["spec"]["nodeName"]) for p in pods
        ) == sorted((p.name, p.ip, p.node) for p in lab.plan.pods())
        assert all(p["status"]["phase"] == "Running" for p in pods)
    finally:
        _ambit("lab", "down")
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
