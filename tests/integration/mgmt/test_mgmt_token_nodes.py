"""`ambit mgmt token` mints tokens only for nodes the config lists: an unknown node is a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mgmt.join_tokens import JoinTokens, UnknownNodeError, record_nodes
from tests.relay_fixtures import write_mesh


def _token(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent.cli", "mgmt", "token", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_unknown_node_gets_no_token(tmp_path: Path) -> None:
    write_mesh(tmp_path / "config")  # node-1 .. node-3
    state = tmp_path / "state"
    ok = _token("--state-dir", str(state), "--node", "node-1", "--config-dir", str(tmp_path / "config"))
    assert ok.returncode == 0 and len(ok.stdout.strip()) > 20, ok.stderr
    refused = _token("--state-dir", str(state), "--node", "node-9", "--config-dir", str(tmp_path / "config"))
    assert refused.returncode != 0 and refused.stdout == ""
    assert refused.stderr.strip().count("\n") == 0 and "'node-9' is not in the config" in refused.stderr
    # Without --config-dir: the node list the running plane recorded; without one, a clear error.
    assert "start the plane" in _token("--state-dir", str(state), "--node", "node-1").stderr
    record_nodes(state, ["node-1"])
    assert _token("--state-dir", str(state), "--node", "node-1").returncode == 0
    assert "is not in the config" in _token("--state-dir", str(state), "--node", "node-2").stderr


def test_library_refuses_unknown_node(tmp_path: Path) -> None:
    with pytest.raises(UnknownNodeError, match="not in the config"):
        JoinTokens(tmp_path).create("node-9", 60, known_nodes={"node-1"})
