"""Policies through the real plane: config store files -> relay (gRPC, mTLS) -> PolicyEngine on the agent.

A policy set that does not compile is NACKed with the engine's message and the agent keeps deciding with
the previous set; a later good set applies, including to connections already established.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.policy.decision import ConnectionAttrs
from agent.policy.engine import PolicyEngine
from agent.relay.client import RelayClient
from agent.state import MeshSnapshot
from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority
from mgmt.server import SERVER_NAME, node_channel_credentials
from tests.relay_fixtures import TD, Plane, start_plane, write_docs, write_mesh

TIMEOUT = 15.0  # a shared 2-vCPU machine


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[Plane, CertificateAuthority]]:
    ca = CertificateAuthority.generate_root(TD)
    write_mesh(tmp_path / "config")
    p = start_plane(tmp_path / "config", tmp_path / "state", ca)
    yield p, ca
    p.stop()


def _wait(pred: object, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _from(namespace: str) -> ConnectionAttrs:
    return ConnectionAttrs(
        source_principal=SpiffeId.workload(TD, namespace, "client"),
        source_ip="10.244.2.9",
        destination_ip="10.244.1.2",
        destination_port=8080,
        destination_workload="demo/web-11",
        destination_namespace="demo",
    )


def _doc(kind: str, name: str, spec: dict) -> dict:
    api = "ambit.io/v1" if kind == "RegoPolicy" else "security.istio.io/v1"
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": "demo"}, "spec": spec}


def test_bad_policy_nacked_previous_set_stays_then_good_set_applies(
    plane: tuple[Plane, CertificateAuthority], tmp_path: Path
) -> None:
    server, ca = plane
    engine = PolicyEngine(TD)
    applied: list[MeshSnapshot] = []

    def on_snapshot(snapshot: MeshSnapshot) -> None:
        engine.update(snapshot)
        applied.append(snapshot)

    client = RelayClient(
        server.target,
        "node-1",
        node_channel_credentials(ca, "node-1"),
        on_snapshot=on_snapshot,
        validate=engine.validate,
        server_name=SERVER_NAME,
    )
    client.start()
    try:
        _wait(lambda: engine.version == server.store.version, "the first config")
        good = engine.version
        # write_mesh's ALLOW policies admit namespace demo only.
        assert engine.authorize(_from("demo")).allow
        assert not engine.authorize(_from("other")).allow

        bad = _doc("RegoPolicy", "broken", {"module": "package ambit\nauthz := {"})
        write_docs(tmp_path / "config" / "bad.yaml", [bad])
        _wait(lambda: server.server.relay.last_nack("node-1") is not None, "the NACK")
        nack = server.server.relay.last_nack("node-1")
        assert nack is not None and "RegoPolicy demo/broken: module does not compile" in nack.error
        assert engine.version == good and client.version == good
        assert engine.authorize(_from("demo")).allow
        assert engine.counters()["updates_rejected"] == 0  # rejected in validate, never applied

        (tmp_path / "config" / "bad.yaml").unlink()
        deny = _doc(
            "AuthorizationPolicy",
            "no-demo",
            {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]},
        )
        write_docs(tmp_path / "config" / "deny.yaml", [deny])
        live = [(1, _from("demo"))]
        _wait(lambda: engine.denies(live[0][1]), "the DENY policy")
        revoked = engine.recheck(live)
        assert [(i, d.policy) for i, d in revoked] == [(1, "demo/no-demo")]
    finally:
        client.stop()


ISTIO_YAML = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: demo
  annotations:
    istio.io/dry-run: "true"
spec:
  action: DENY
  rules:
  - to:
    - operation:
        methods: ["POST"]
        paths: ["/admin*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: mesh-deny-other
  namespace: istio-system
spec:
  action: DENY
  rules:
  - from:
    - source:
        serviceAccounts: ["other/client"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: waypoint-only
  namespace: demo
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: web
  action: DENY
  rules:
  - {}
"""


def test_istio_yaml_keeps_its_meaning_through_the_relay(
    plane: tuple[Plane, CertificateAuthority], tmp_path: Path
) -> None:
    """The dry-run annotation, the istio-system root and targetRefs reach the agent's engine intact."""
    server, ca = plane
    (tmp_path / "config" / "istio.yaml").write_text(ISTIO_YAML)
    engine = PolicyEngine(TD)
    client = RelayClient(
        server.target,
        "node-1",
        node_channel_credentials(ca, "node-1"),
        on_snapshot=engine.update,
        validate=engine.validate,
        server_name=SERVER_NAME,
    )
    client.start()
    try:
        # deny-admin (L7 attributes) and waypoint-only (targetRefs) are the two policies with warnings.
        _wait(lambda: engine.counters()["policy_warnings"] == 2, "the Istio policies")
        demo = engine.authorize(_from("demo"))
        # Enforced, deny-admin would deny everything (its L7-only rule, fail closed): dry-run reports it.
        assert demo.allow and demo.dry_run and "dry-run: demo/deny-admin would deny" in demo.reason
        other = engine.authorize(_from("other"))  # _from's service account is "client"
        assert not other.allow and other.policy == "istio-system/mesh-deny-other"
        rows = {r["name"]: r for r in engine.rows()}
        assert rows["waypoint-only"]["scope"] == "waypoint (not enforced)"
    finally:
        client.stop()
