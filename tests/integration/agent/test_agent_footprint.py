"""What a running node agent costs: no LLVM (nor rego-cpp without a RegoPolicy) in its address space,
every thread named and accounted for, and memory that comes back once a burst of connections has closed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab import mesh
from agent.lab.plan import LabPlan
from agent.lab.probe import ECHO_PORT
from tests.conftest import running_mesh
from tests.integration.agent import footprint

pytestmark = pytest.mark.root

# The steady-state threads of an agent (docs/footprint.md lists what each does). Threads that come
# and go: one per admin/metrics request being served, the proxy's destination lookups.
STEADY = {
    "python": ["MainThread", "http", "identity-rotation", "housekeeping"],
    "native": ["engine-loop", "grpc_global_tim", "event_engine", "lifeguard"],
}
MAX_STEADY_THREADS = 16
TRANSIENT = ("process_request_thread", "ambit-proxy-fetch")
HELD = 2000


@pytest.fixture(scope="module")
def meshlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabPlan]:
    with running_mesh(tmp_path_factory, 1, ("pod-2-1",), ECHO_PORT) as plan:
        yield plan


def _agent_pid(plan: LabPlan, node: str) -> int:
    return footprint.pid_of(plan.prefix, f"agent-{node}")


def test_no_llvm_and_no_rego_mapped_in_the_agent(meshlab: LabPlan) -> None:
    # rego-cpp (regopy's librego_shared, ~11 MB) is loaded only once a RegoPolicy applies; this mesh has none.
    # cryptography's Rust bindings (~9 MiB): the agent's keys and certificates go through the engine's
    # OpenSSL (native/pki.py).
    for node in meshlab.nodes:
        mapped = Path(f"/proc/{_agent_pid(meshlab, node.name)}/maps").read_text()
        unwanted = ("libLLVM", "libclang", "libbcc", "librego_shared", "cryptography/hazmat/bindings")
        assert [lib for lib in unwanted if lib in mapped] == [], node.name


# Packages an idle agent does not import (docs/footprint.md): each is loaded on first use, if ever.
NOT_IMPORTED_IDLE = ("cryptography", "regopy", "yaml", "bcc", "pyroute2")


def test_idle_agent_imports_none_of_the_lazy_packages(meshlab: LabPlan) -> None:
    for node in meshlab.nodes:
        memory = mesh.admin_get(meshlab, node.name, "/memory")
        loaded = {name.split(".")[0] for name in memory["python_modules"]}
        assert "native" in loaded and "grpc" in loaded  # the list is the agent's, not an empty answer
        assert sorted(loaded & set(NOT_IMPORTED_IDLE)) == [], node.name
        assert memory["rss_kib"] == memory["anon_kib"] + memory["file_kib"]


def test_every_thread_is_named_and_counted(meshlab: LabPlan) -> None:
    rows = [
        r for r in mesh.admin_get(meshlab, "node-1", "/threads") if not any(t in r["name"] for t in TRANSIENT)
    ]
    names = {kind: {r["name"] for r in rows if r["kind"] == kind} for kind in STEADY}
    for kind, expected in STEADY.items():
        assert set(expected) <= names[kind], kind
    # A native thread still called "python" is one nobody accounted for (the engine's loops were).
    assert "python" not in names["native"]
    assert len(rows) <= MAX_STEADY_THREADS, [r["name"] for r in rows]


def _anon_rss_mib(pid: int) -> float:
    return footprint.rss_mib(pid, "RssAnon")


def test_memory_comes_back_after_a_burst_of_connections(meshlab: LabPlan) -> None:
    pids = [_agent_pid(meshlab, n.name) for n in meshlab.nodes]
    idle = [_anon_rss_mib(p) for p in pids]
    with footprint.holder(meshlab, "pod-1-1", meshlab.pod("pod-2-1").ip, ECHO_PORT) as holder:
        assert holder(f"open {HELD}") == HELD
        held = [_anon_rss_mib(p) for p in pids]
        holder("close")
    # At least 40% of what the burst took is given back (measured: 60-75%; before: none, RSS kept growing).
    bounds = [h - (h - i) * 0.4 for i, h in zip(idle, held, strict=True)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = [_anon_rss_mib(p) for p in pids]
        if all(a <= b for a, b in zip(after, bounds, strict=True)):
            return
        time.sleep(0.5)
    raise AssertionError(f"idle {idle} MiB, held {held}, after close {after}: not given back")
