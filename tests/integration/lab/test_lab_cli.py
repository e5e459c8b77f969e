"""The lab through the real `ambit` command: up, reachability, idempotence, down leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.lab import fabric
from tests.conftest import ambit_cli

pytestmark = pytest.mark.root


def ambit(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ambit_cli(*args, check=check, timeout=120)


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_up_check_twice_down(lab_prefix: str) -> None:
    before = netns_list()
    try:
        ambit("lab", "up")
        status = json.loads(ambit("lab", "status", "-o", "json").stdout)
        pods = [r for r in status if r["kind"] == "pod"]
        assert len(pods) == 4 and all(r["state"] == "up" for r in status)
        assert {r["netns"] for r in status} <= netns_list()

        again = ambit("lab", "up")
        assert "already up" in again.stderr

        check = json.loads(ambit("lab", "check", "-o", "json").stdout)
        assert len(check) == 12
        assert all(r["result"] == "ok" for r in check), check

        table = ambit("lab", "status").stdout.splitlines()
        assert table[0].split()[:4] == ["KIND", "NAME", "NODE", "IP"]

        ran = ambit("lab", "exec", "pod-2-1", "--", "cat", "/proc/net/fib_trie")
        assert "10.244.2.2" in ran.stdout
    finally:
        ambit("lab", "down")
    # Compared by prefix: other labs (other test runs on this machine) may come and go meanwhile.
    assert {n for n in netns_list() if n.startswith(lab_prefix)} == {
        n for n in before if n.startswith(lab_prefix)
    }
    assert fabric.existing_netns(lab_prefix) == []


def test_down_stops_processes_left_in_lab_namespaces(lab_prefix: str) -> None:
    from agent import netns
    from agent.lab import control
    from agent.lab.plan import plan_lab

    plan = plan_lab(1, 1, lab_prefix)
    control.up(plan)
    try:
        sleeper = netns.popen_in(plan.pods()[0].netns, ["sleep", "300"])
        assert sleeper.pid in fabric.pids_in_netns(plan.pods()[0].netns)
    finally:
        control.down(lab_prefix)
    sleeper.wait(timeout=10)
    assert not os.path.exists(f"/proc/{sleeper.pid}")
    assert fabric.existing_netns(lab_prefix) == []


@pytest.mark.parametrize(
    "args",
    [
        ("lab", "up", "--nodes", "0"),
        ("lab", "up", "--nodes", "3", "--pod-cidr", "10.9.0.0/23"),
        ("lab", "up", "--pods", "-2"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(lab_prefix: str, args: tuple[str, ...]) -> None:
    proc = ambit(*args, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("ambit: error:")
    assert fabric.existing_netns(lab_prefix) == []


def test_exec_unknown_pod_exits_2(lab_prefix: str) -> None:
    from agent.lab import control
    from agent.lab.plan import plan_lab

    control.up(plan_lab(1, 1, lab_prefix))
    try:
        proc = ambit("lab", "exec", "pod-7-7", "--", "true", check=False)
        assert proc.returncode == 2 and "unknown pod" in proc.stderr
    finally:
        control.down(lab_prefix)


def test_unknown_command_prints_help_and_exits_2() -> None:
    proc = ambit("frobnicate", check=False)
    assert proc.returncode == 2 and "usage: ambit" in proc.stderr


def test_lab_processes_show_in_status_and_stop_with_down(lab_prefix: str, tmp_path: Path) -> None:
    from agent.lab import control
    from agent.lab.plan import plan_lab

    plan = plan_lab(1, 1, lab_prefix)
    control.up(plan)
    try:
        proc = control.start_process(
            lab_prefix, "sleeper", plan.nodes[0].netns, ["sleep", "300"], tmp_path / "s.log"
        )
        status = json.loads(ambit("lab", "status", "-o", "json").stdout)
        row = next(r for r in status if r["kind"] == "process")
        assert row["name"] == "sleeper" and row["state"] == f"running pid {proc.pid}"
        # The management plane's address answers on the fabric bridge from inside a node.
        ping = ambit(
            "lab",
            "exec",
            "node-1",
            "--",
            sys.executable,
            "-c",
            f"import socket; s=socket.socket(); s.settimeout(2); print(s.connect_ex(('{plan.mgmt_ip}', 9)))",
        )
        assert ping.stdout.strip() == "111"  # ECONNREFUSED: the address is there, no port 9 listener
    finally:
        control.down(lab_prefix)
    assert not os.path.exists(f"/proc/{proc.pid}") or fabric._proc_state(proc.pid) == "Z"
