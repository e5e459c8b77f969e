"""Root CA rotation on a live mesh: `ambit mgmt rotate-root` drives prepare -> activate -> drop on the
running plane while a long-lived connection from pod-1-1 to pod-2-1 (through HBONE) keeps echoing; new
connections work after every step, and at the end every certificate the agents hold chains to the new root.

No timings are asserted: each step is followed by waiting (generous deadlines) for what the agents show:
their log line for a new trust bundle (lab agents poll every 5 s) and `ambit debug certs` for re-issued certs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent import netns as nsx
from agent.lab import mesh
from agent.lab.plan import LabPlan
from agent.lab.probe import ECHO_PORT, echo_roundtrip
from tests.conftest import ambit_debug_json, running_mesh

pytestmark = pytest.mark.root

STEP_DEADLINE_S = 150.0  # generous: many bundle polls plus re-issue jitter
NODES = ("node-1", "node-2")


@pytest.fixture(scope="module")
def rotlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabPlan]:
    with running_mesh(tmp_path_factory, 1, ("pod-2-1",), ECHO_PORT) as plan:
        yield plan


def _until(ready: Callable[[], bool], what: str, deadline_s: float = STEP_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


class LongLived:
    """A client in pod-1-1 holding ONE connection to pod-2-1's echo server; each line sent comes back."""

    CODE = (
        "import socket,sys\n"
        "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=60)\n"
        "print('up',flush=True)\n"
        "for line in sys.stdin:\n"
        "    data=line.encode(); s.sendall(data); got=b''\n"
        "    while len(got)<len(data):\n"
        "        chunk=s.recv(65536)\n"
        "        if not chunk: print('closed',flush=True); sys.exit(1)\n"
        "        got+=chunk\n"
        "    sys.stdout.write(got.decode()); sys.stdout.flush()\n"
    )

    def __init__(self, plan: LabPlan) -> None:
        argv = [sys.executable, "-c", self.CODE, plan.pod("pod-2-1").ip, str(ECHO_PORT)]
        self.proc: subprocess.Popen[str] = nsx.popen_in(  # type: ignore[assignment]
            plan.pod("pod-1-1").netns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._line() == "up"
        self.sent = 0

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def echo(self) -> str:
        assert self.proc.stdin is not None
        self.sent += 1
        msg = f"still-here-{self.sent}"
        self.proc.stdin.write(msg + "\n")
        self.proc.stdin.flush()
        got = self._line()
        assert got == msg, f"long-lived connection broke: {got!r}"
        return got

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _new_connection(plan: LabPlan, tag: str) -> None:
    payload = f"fresh-{tag}-{time.time_ns()}".encode()

    def run(ip: str) -> bytes | str:
        try:
            return echo_roundtrip(ip, ECHO_PORT, payload, timeout=5)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"

    got = nsx.run_in(plan.pod("pod-1-1").netns, run, plan.pod("pod-2-1").ip, timeout=20)
    assert got == payload, f"new connection after {tag}: {got!r}"


def _rotate(state: Path, step: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "mgmt", "rotate-root", "--state-dir", str(state), "--step", step],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "the running plane loaded revision" in out.stdout, out.stdout
    assert "PRIVATE KEY" not in out.stdout + out.stderr
    return out.stdout


def _certs(plan: LabPlan, node: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = ambit_debug_json(plan.prefix, node, "certs")
    return rows


def _all_issued_by(plan: LabPlan, node: str, root: x509.Certificate) -> bool:
    rows = _certs(plan, node)
    subject = root.subject.rfc4514_string()
    return bool(rows) and all(r["issuer"] == subject and r["state"] in ("node", "valid") for r in rows)


class AgentLogs:
    """The agents' log files, read from a mark on: 'trust bundle updated' lines say what each one trusts."""

    def __init__(self, plan: LabPlan) -> None:
        self._paths = {n: mesh.run_dir(plan.prefix) / "logs" / f"agent-{n}.log" for n in NODES}
        self._marks = dict.fromkeys(NODES, 0)

    def mark(self) -> None:
        self._marks = {n: p.stat().st_size for n, p in self._paths.items()}

    def bundle_seen(self, node: str, roots: int, signer: x509.Certificate) -> bool:
        with self._paths[node].open("rb") as f:
            f.seek(self._marks[node])
            text = f.read().decode(errors="replace")
        want = (
            f"trust bundle updated: {roots} root(s) trusted, signing root {signer.subject.rfc4514_string()}"
        )
        return want in text


def test_root_rotation_keeps_connections_up(rotlab: LabPlan) -> None:
    state = mesh.run_dir(rotlab.prefix) / "mgmt"
    old_root = x509.load_pem_x509_certificate((state / "ca-cert.pem").read_bytes())
    for node in NODES:
        _until(lambda n=node: _all_issued_by(rotlab, n, old_root), f"{node} certificates")  # type: ignore[misc]
    logs = AgentLogs(rotlab)
    live = LongLived(rotlab)
    try:
        live.echo()
        _new_connection(rotlab, "start")

        # prepare: the new root joins every agent's bundle; nothing is signed by it yet.
        logs.mark()
        _rotate(state, "prepare")
        new_root = x509.load_pem_x509_certificate((state / "ca-pending-cert.pem").read_bytes())
        for node in NODES:
            _until(lambda n=node: logs.bundle_seen(n, 2, old_root), f"{node} trusting the new root")  # type: ignore[misc]
        live.echo()
        _new_connection(rotlab, "prepare")

        # activate: the plane signs with the new root; agents notice and re-issue everything they hold.
        _rotate(state, "activate")
        for node in NODES:
            _until(lambda n=node: _all_issued_by(rotlab, n, new_root), f"{node} re-issued by the new root")  # type: ignore[misc]
        live.echo()
        _new_connection(rotlab, "activate")

        # drop: the old root leaves the bundles; what was established with it stays up.
        logs.mark()
        _rotate(state, "drop")
        live.echo()
        _new_connection(rotlab, "drop")
        for node in NODES:
            _until(lambda n=node: logs.bundle_seen(n, 1, new_root), f"{node} dropping the old root")  # type: ignore[misc]
        live.echo()
        _new_connection(rotlab, "old root gone")
        rows = _certs(rotlab, "node-1")
        assert {r["identity"] for r in rows} >= {
            "spiffe://cluster.local/node/node-1",
            "spiffe://" + mesh.principal("pod-1-1"),
        }
        assert {r["issuer"] for r in rows} == {new_root.subject.rfc4514_string()}
    finally:
        live.close()
