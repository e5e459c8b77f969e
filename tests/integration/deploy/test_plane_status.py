"""`ambit debug status`: per node, the version it ACKed or NACKed, from the plane's admin API (real relay)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.state import MeshSnapshot
from mgmt.admin import PlaneAdmin
from mgmt.ca import CertificateAuthority
from tests.relay_fixtures import TD, Plane, relay_client, start_plane, wait_until, write_docs, write_mesh

TIMEOUT = 15.0


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[Plane, CertificateAuthority, PlaneAdmin]]:
    ca = CertificateAuthority.generate_root(TD)
    write_mesh(tmp_path / "config")
    p = start_plane(tmp_path / "config", tmp_path / "state", ca)
    admin = PlaneAdmin(p.server.relay, "127.0.0.1:0")
    admin.start()
    admin.set_ready()
    yield p, ca, admin
    admin.stop()
    p.stop()


def _status(admin: PlaneAdmin, output: str = "json") -> str:
    argv = [sys.executable, "-m", "agent.cli", "debug", "status", "--plane", f"127.0.0.1:{admin.port}"]
    out = subprocess.run([*argv, "-o", output], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_status_shows_who_acked_and_who_nacked(
    plane: tuple[Plane, CertificateAuthority, PlaneAdmin], tmp_path: Path
) -> None:
    server, ca, admin = plane
    relay = server.server.relay
    first = server.store.version

    def refuse_changes(snapshot: MeshSnapshot) -> None:
        if snapshot.version != first:
            raise ValueError(f"node-2 cannot apply version {snapshot.version}")

    with relay_client(server.target, ca, "node-1"), relay_client(server.target, ca, "node-2", refuse_changes):
        assert wait_until(
            lambda: relay.acked_version("node-1") == relay.acked_version("node-2") == first, TIMEOUT
        )
        before = json.loads(_status(admin))
        assert [(n["node"], n["state"]) for n in before["nodes"]] == [
            ("node-1", "SYNCED"),
            ("node-2", "SYNCED"),
        ]

        docs = [{"apiVersion": "ambit.io/v1", "kind": "Namespace", "metadata": {"name": "extra"}}]
        write_docs(tmp_path / "config" / "extra.yaml", docs)
        assert wait_until(lambda: server.store.version > first, TIMEOUT)
        second = server.store.version
        assert wait_until(lambda: relay.acked_version("node-1") == second, TIMEOUT)
        assert wait_until(lambda: relay.last_nack("node-2") is not None, TIMEOUT)
        after = json.loads(_status(admin))

    assert after["version"] == second
    rows = {n["node"]: n for n in after["nodes"]}
    assert rows["node-1"]["state"] == "SYNCED" and rows["node-1"]["acked_version"] == second
    assert rows["node-2"]["state"] == "NACKED"
    assert rows["node-2"]["acked_version"] == first and rows["node-2"]["nacked_version"] == second
    assert f"cannot apply version {second}" in rows["node-2"]["last_nack"]
    # The clients are gone: node-1 is disconnected, node-2 still shows its NACK.
    rows = {n["node"]: n["state"] for n in json.loads(_status(admin))["nodes"]}
    assert rows == {"node-1": "DISCONNECTED", "node-2": "NACKED"}
    table = _status(admin, "table")
    assert "NACKED" in table and f"plane config version {second}" in table


def test_status_of_an_unreachable_plane_is_a_clear_error() -> None:
    argv = [sys.executable, "-m", "agent.cli", "debug", "status", "--plane", "127.0.0.1:1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "cannot reach the plane's admin API at 127.0.0.1:1" in out.stderr
    assert "Traceback" not in out.stderr
