"""Shared fixtures. Tests marked `root` need root and network namespaces; they run here and in CI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from tests.kube_fixtures import kube_api, kube_crds  # noqa: F401 (the session's real API server)

if TYPE_CHECKING:
    from agent.lab.plan import LabPlan


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab_prefix(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A unique lab prefix and state dir, so concurrent tests and a developer's own lab never clash."""
    prefix = "t" + uuid.uuid4().hex[:4] + "-"
    monkeypatch.setenv("AMBIT_LAB_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("AMBIT_LAB_PREFIX", prefix)
    yield prefix


@contextlib.contextmanager
def running_mesh(
    tmp_path_factory: pytest.TempPathFactory, pods_per_node: int, echo_pods: Sequence[str], echo_port: int
) -> Iterator[LabPlan]:
    """A 2-node lab with the real plane and agents, echo servers in `echo_pods`; for module-scoped fixtures
    (a unique prefix and state dir, like `lab_prefix`, and everything torn down after)."""
    from agent.lab import control, mesh
    from agent.lab.plan import plan_lab

    prefix = "m" + uuid.uuid4().hex[:4] + "-"
    os.environ["AMBIT_LAB_STATE_DIR"] = str(tmp_path_factory.mktemp("labstate"))
    plan = plan_lab(2, pods_per_node, prefix)
    control.up(plan)
    try:
        mesh.up(plan, lambda _: None)
        for pod in echo_pods:
            mesh.start_echo_server(plan, pod, echo_port)
        yield plan
    finally:
        control.down(prefix)
        os.environ.pop("AMBIT_LAB_STATE_DIR", None)


def ambit_cli(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The real `ambit` command in a subprocess; with `check`, a non-zero exit fails with its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ambit {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def ambit_debug_json(prefix: str, node: str, view: str) -> Any:
    """`ambit debug --node NODE VIEW -o json` on a lab; asserts exit 0 and no private key in its output."""
    argv = [
        sys.executable,
        "-m",
        "agent.cli",
        "debug",
        "--node",
        node,
        "--prefix",
        prefix,
        view,
        "-o",
        "json",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "PRIVATE KEY" not in out.stdout
    return json.loads(out.stdout)


@contextlib.contextmanager
def live_connection(netns_name: str, ip: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """A long-lived echo connection held by a child in `netns_name`, established when this yields; the
    child prints "closed..." and exits when the connection is closed on it (or after 30 s)."""
    from agent import netns as nsx

    code = (
        "import socket\n"
        f"s=socket.create_connection(('{ip}',{port}),timeout=30)\n"
        "s.sendall(b'hi'); assert s.recv(2)==b'hi'; print('up',flush=True)\n"
        "s.settimeout(30)\n"
        "try:\n  d=s.recv(10)\n  print('closed' if d==b'' else 'data',flush=True)\n"
        "except OSError as e: print('closed',type(e).__name__,flush=True)\n"
    )
    proc = nsx.popen_in(netns_name, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        yield proc
    finally:
        proc.kill()
        proc.wait()
