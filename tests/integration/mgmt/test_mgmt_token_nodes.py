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


def test_gateway_tokens_only_for_gateways_of_the_config(tmp_path: Path) -> None:
    config = tmp_path / "config"
    write_mesh(config)
    (config / "gw.yaml").write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: shop}\n"
        "spec: {gatewayClassName: ambit, listeners: [{name: h, port: 80, protocol: HTTP}]}\n"
    )
    state = str(tmp_path / "state")
    ok = _token("--state-dir", state, "--gateway", "shop/edge", "--config-dir", str(config))
    assert ok.returncode == 0 and len(ok.stdout.strip()) > 20, ok.stderr
    assert JoinTokens(Path(state)).consume(ok.stdout.strip()) == "gateway:shop/edge"
    refused = _token("--state-dir", state, "--gateway", "shop/nope", "--config-dir", str(config))
    assert (
        refused.returncode != 0 and "'shop/nope' is not in the config (gateways: shop/edge)" in refused.stderr
    )
    assert "start the plane" in _token("--state-dir", state, "--gateway", "shop/edge").stderr
    both = _token("--state-dir", state, "--gateway", "shop/edge", "--node", "node-1")
    assert both.returncode != 0 and "--node N or --gateway" in both.stderr
    assert (
        "namespace/name"
        in _token("--state-dir", state, "--gateway", "edge", "--config-dir", str(config)).stderr
    )
