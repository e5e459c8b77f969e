"""The multi-VM lab's files: Vagrant accepts them, the scripts parse, the mesh config is one the plane
accepts and matches the VMs and pods the scripts make, and .gitignore hides nothing that is tracked."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.lab.mesh import config_problems

ROOT = Path(__file__).resolve().parents[3]
VAGRANT = ROOT / "vagrant"


@pytest.mark.skipif(
    shutil.which("vagrant") is None, reason="vagrant is not installed (scripts/setup-system.sh)"
)
def test_vagrant_validate(tmp_path: Path) -> None:
    # VAGRANT_DOTFILE_PATH: validate must not leave a .vagrant directory in the checkout.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot")}
    out = subprocess.run(
        ["vagrant", "validate"], cwd=VAGRANT, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "validated successfully" in out.stdout


def test_scripts_parse() -> None:
    for script in ("provision.sh", "fetch-state.sh"):
        subprocess.run(["bash", "-n", str(VAGRANT / script)], check=True, timeout=30)


def test_config_is_accepted_and_matches_the_vms() -> None:
    assert config_problems(VAGRANT / "config") == []
    docs = [
        d for f in sorted((VAGRANT / "config").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d
    ]
    vms = dict(re.findall(r'"(\w+)"\s*=>\s*"([\d.]+)"', (VAGRANT / "Vagrantfile").read_text()))
    nodes = {d["metadata"]["name"]: d["spec"]["addresses"][0] for d in docs if d["kind"] == "Node"}
    assert nodes == {n: ip for n, ip in vms.items() if n != "mgmt"}
    workloads = [d for d in docs if d["kind"] == "Workload"]
    assert {w["spec"]["node"] for w in workloads} == set(nodes)
    # provision.sh gives node INDEX's pod 10.244.INDEX.2 (INDEX is the VM's position in the Vagrantfile).
    index = {name: i for i, name in enumerate(vms)}
    for w in workloads:
        assert w["spec"]["ips"] == [f"10.244.{index[w['spec']['node']]}.2"]
    # Agents and the plane run as systemd units.
    provision = (VAGRANT / "provision.sh").read_text()
    assert "unit ambit-mgmt " in provision and "unit ambit-agent " in provision


def test_gitignore_hides_no_tracked_file() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        cwd=ROOT,
        input=tracked,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout == "", ignored.stdout
    assert "vagrant/.state/" in (ROOT / ".gitignore").read_text()  # join tokens never get committed
